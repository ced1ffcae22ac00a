// The command lives in the library (boft::cli::extract) so the Python package runs the same code.
fn main() {
    boft::cli::run(boft::cli::extract::PROGRAM, || {
        boft::cli::extract::main(std::env::args_os())
    })
}
