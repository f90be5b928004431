//! kiln: one declarative node profile → cloud-init payload, NoCloud seed and release bundle.
//!
//! Flow: [`profile`] (strict parse, `extends`, positions) → [`resolve`] (defaults, pins,
//! secrets → [`kiln_plan::Plan`]) → [`render`] (cloud-config, bundle, seed, build.json) →
//! [`validate`] (cloud-init schemas, size budgets). [`cli`] wires the subcommands.

pub mod bake;
pub mod bench;
pub mod cli;
pub mod cmd_gitops;
pub mod cmd_qemu;
pub mod daemon_build;
pub mod diag;
pub mod elf;
pub mod gitops;
pub mod gzcache;
pub mod keyvault;
pub mod lock;
pub mod opts;
pub mod pins;
pub mod pipeline;
pub mod profile;
pub mod profile_gitops;
pub mod publish;
pub mod render;
pub mod resolve;
pub mod resolve_gitops;
pub mod resolve_role;
pub mod secret_scan;
pub mod seed;
pub mod source;
pub mod validate;
