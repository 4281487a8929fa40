//! `capnet-sandbox`: the setup helper that capnetd execs (from a sealed memfd) for every
//! sandbox. Not meant to be run by hand; see `capnet_supervisor::sandbox::helper`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(capnet_supervisor::sandbox::helper::main(&args));
}
