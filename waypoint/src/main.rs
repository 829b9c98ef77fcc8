fn main() {
    eprintln!("weft-waypoint: not wired yet");
    std::process::exit(2);
}
