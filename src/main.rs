fn main() {
    std::process::exit(chuzhan_gate::cli::main())
}
