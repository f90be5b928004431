//! QEMU glue.
pub mod mirror;
