pub mod cli;
pub mod cmd_qemu;
pub mod publish;
