// The command lives in the library (boft::cli::convert) so the Python package runs the same code.
fn main() {
    boft::cli::run(boft::cli::convert::PROGRAM, || {
        boft::cli::convert::main(std::env::args_os())
    })
}
