//! Workflows: a ComfyUI-like session of steps over models, run with one of three strategies of
//! managing weights, and the comparison of all three under a memory cap.
//!
//! The dependencies run one way: [`format`] parses a file; [`catalog`] resolves its models
//! (generating synthetic ones) and holds the arithmetic every strategy shares; [`fit`] checks a
//! configuration against its cap; [`strategy`] implements the strategies; [`runner`] runs one
//! in this process; [`compare`] runs each in a child process, under a memory cgroup, through
//! the runner's reports.

pub(crate) mod catalog;
pub(crate) mod compare;
pub(crate) mod fit;
pub(crate) mod format;
pub(crate) mod runner;
pub(crate) mod strategy;

pub(crate) use format::{ModelSource, Op, Workflow};
pub(crate) use strategy::Strategy;
