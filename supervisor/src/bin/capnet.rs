//! `capnet`: the administrator's command line (see `capnet_supervisor::cli`).

fn main() {
    std::process::exit(capnet_supervisor::cli::main());
}
