//! The sandboxed process that loads one driver plugin (see `capnet_supervisor::driver_host`).

use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.as_slice() {
        [flag, path] if flag == "--inspect" => {
            capnet_supervisor::driver_host::inspect_main(&PathBuf::from(path))
        }
        [flag, path] if flag == "--inspect-fd" => {
            capnet_supervisor::driver_host::inspect_fd_main(PathBuf::from(path))
        }
        [flag, path] if flag == "--plugin" => {
            capnet_supervisor::driver_host::serve_main(PathBuf::from(path))
        }
        _ => {
            eprintln!(
                "usage: capnet-driver-host --plugin NAME   (started by capnetd)\n       \
                 capnet-driver-host --inspect FILE"
            );
            capnet_supervisor::driver_host::exit::USAGE
        }
    };
    std::process::exit(code);
}
