// The command lives in the library (boft::cli::verify) so the Python package runs the same code.
fn main() {
    boft::cli::run(boft::cli::verify::PROGRAM, || {
        boft::cli::verify::main(std::env::args_os())
    })
}
