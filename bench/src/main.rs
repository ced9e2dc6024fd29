//! The load benchmark (issue: the load benchmark). Not written yet.

fn main() {
    eprintln!("warren-bench: not implemented yet");
    std::process::exit(2);
}
