// The command lives in the library (boft::cli::merge) so the Python package runs the same code.
fn main() {
    boft::cli::run(boft::cli::merge::PROGRAM, || {
        boft::cli::merge::main(std::env::args_os())
    })
}
