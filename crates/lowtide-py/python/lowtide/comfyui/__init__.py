"""lowtide and ComfyUI: a headless, in-process ComfyUI for tests and demos.

``_headless`` imports a ComfyUI source tree for use on the CPU (its own tree read-only, the
folders it writes pointed elsewhere), runs API-format workflows through ComfyUI's own
``execution.PromptExecutor`` and loads custom node packages; ``_synthetic`` writes seeded
SD1.5-shaped checkpoints and LoRAs that ComfyUI detects as SD1.5; ``_workflows`` builds the
text-to-image workflow they run in.

Importing this package imports nothing from ComfyUI: ComfyUI is found and imported only when
one of those functions is called, once per process (its state is global)."""
