fn main() -> std::process::ExitCode {
    kiln_firstboot::cli::main()
}
