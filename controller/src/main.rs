//! weft-controller entry point.

fn main() {
    eprintln!("weft-controller: not wired yet");
    std::process::exit(2);
}
