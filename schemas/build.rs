//! Compiles the schemas with the `capnp` tool (Debian: `capnproto`), which also needs
//! `/capnp/stream.capnp` for `-> stream` methods (Debian: `libcapnp-dev`).

use std::path::Path;

const SCHEMAS: &[&str] = &[
    "util.capnp",
    "powerbox.capnp",
    "persistent.capnp",
    "system-persistent.capnp",
    "ip.capnp",
    "manifest.capnp",
    "policy.capnp",
    "driver.capnp",
    "grain.capnp",
    "admin.capnp",
];

fn main() {
    let include_dirs = ["/usr/include", "/usr/local/include"];
    if !include_dirs
        .iter()
        .any(|d| Path::new(d).join("capnp/stream.capnp").exists())
    {
        panic!(
            "capnp/stream.capnp not found in {include_dirs:?}: install the Cap'n Proto \
             headers (Debian: `apt-get install capnproto libcapnp-dev`, or run `make deps`)"
        );
    }
    let mut cmd = capnpc::CompilerCommand::new();
    for dir in include_dirs {
        if Path::new(dir).exists() {
            cmd.import_path(dir);
        }
    }
    for schema in SCHEMAS {
        println!("cargo:rerun-if-changed={schema}");
        cmd.file(schema);
    }
    if let Err(e) = cmd.run() {
        panic!(
            "compiling the Cap'n Proto schemas failed: {e}\n\
             (is the `capnp` tool installed? Debian: `apt-get install capnproto libcapnp-dev`, \
             or run `make deps`)"
        );
    }
}
