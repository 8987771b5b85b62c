//! The `lowtide` command.

mod bench;
mod bench_shape;
mod demo;
mod inspect;
mod logger;
mod run;
mod workflow;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keeps model weights in the fastest memory that fits; clean weights ebb back to their file.
#[derive(Debug, Parser)]
#[command(name = "lowtide", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate safetensors or GGUF files (or sharded models) and list their tensors.
    Inspect(inspect::Args),
    /// Run a workflow (TOML) with one strategy, or compare all three under a memory cap.
    #[command(
        after_help = "The workflow format, what each step does (`compute` hashes every weight as \
the device holds it, standing in for a forward pass), the LoRA naming convention and the rule a \
memory cap must meet: docs/workflows.md in the lowtide repository; examples in examples/."
    )]
    Run(run::Args),
    /// Generate an SDXL-like model set and compare the strategies on it under a memory cap.
    Demo(demo::Args),
    /// Measure restores, drops and spills against raw direct I/O and memcpy in one run.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    logger::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`lowtide inspect ... | head`): not an error of ours.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lowtide: error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes on one line, each cause once.
pub(crate) fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    terminal_safe(&line)
}

/// `line` safe to print on a terminal: newlines become spaces and every other control
/// character is escaped (`\u{1b}`), so that no text from a file (a tensor name, a path) that
/// an error quotes can move the cursor or rewrite the line.
pub(crate) fn terminal_safe(line: &str) -> String {
    lowtide::Escaped(&line.replace('\n', " ")).to_string()
}
