//! `kiln gitops check`: what Argo CD v3.4.7 would do with the root Application's source, run
//! offline against a local checkout of the GitOps repository ([`check::check`]).
//!
//! - [`glob`]: include/exclude globs exactly as Argo CD matches them;
//! - [`select`]: which files the repo-server reads;
//! - [`reader`]: multi-document YAML and JSON with line numbers (fuzzed);
//! - [`kinds`]: what the target cluster serves, and the schemas kiln has for it;
//! - [`check`]: findings per document, and the child Applications of the same repository;
//! - [`report`]: text and JSON output.

pub mod check;
pub mod glob;
pub mod kinds;
pub mod reader;
pub mod report;
pub mod select;

pub use check::{check, AppStatus, Class, Finding, Report, Root};
