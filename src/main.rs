fn main() {
    std::process::exit(capy::cli::main());
}
