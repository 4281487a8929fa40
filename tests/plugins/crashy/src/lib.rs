//! A driver plugin for crash-isolation tests: plain TCP, except that a connection to
//! `crash_port` crashes the driver in the configured way (`mode = "panic" | "abort" |
//! "segfault" | "hang"`), or every connection does if `crash_port = 0`.

use std::rc::Rc;

use capnet_driver_api::{
    ConnectContext, Connection, Driver, DriverError, DriverHost, Manifest, Privileges, Provided,
};

/// Options.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// "panic", "abort" or "segfault".
    #[serde(default)]
    mode: String,
    /// The port whose connections crash the driver (0: every connection).
    #[serde(default)]
    crash_port: u16,
}

/// The crashing driver.
pub struct Crashy {
    mode: String,
    crash_port: u16,
}

impl Driver for Crashy {
    type Options = Options;

    fn manifest() -> Manifest {
        Manifest {
            name: "crashy".into(),
            version: "0.1.0".into(),
            description: "test plugin that crashes on demand".into(),
            author: "capnet tests".into(),
            provides: vec![Provided {
                interface_id: capnet_driver_api::capnet_schemas::ids::IP_NETWORK,
                name: "IpNetwork".into(),
                protocols: vec!["tcp".into()],
            }],
            privileges: Privileges {
                outbound_tcp: true,
                inbound_tcp: true,
                dns: true,
                ..Default::default()
            },
        }
    }

    fn start(options: Options, _host: &DriverHost) -> Result<Self, DriverError> {
        match options.mode.as_str() {
            "panic" | "abort" | "segfault" | "hang" => Ok(Self {
                mode: options.mode,
                crash_port: options.crash_port,
            }),
            other => Err(DriverError::Options(format!(
                "mode {other:?} must be panic, abort, segfault or hang"
            ))),
        }
    }

    async fn connect(self: Rc<Self>, cx: ConnectContext) -> Result<Connection, DriverError> {
        if self.crash_port == 0 || cx.target().port == self.crash_port {
            match self.mode.as_str() {
                "panic" => panic!("crashy: deliberate panic on connect to {}", cx.target()),
                "abort" => std::process::abort(),
                // Blocks the driver's only thread: it stops answering everything, including
                // the supervisor's health checks.
                "hang" => std::thread::sleep(std::time::Duration::from_secs(3600)),
                _ => {
                    // SAFETY: not sound at all: a deliberate write through a null pointer, so
                    // the process dies of a real SIGSEGV, which is the point of this plugin.
                    unsafe {
                        std::ptr::null_mut::<u8>().write_volatile(1);
                    }
                }
            }
        }
        let socket = cx.dial().await?;
        cx.finish_outbound(socket).await
    }
}

capnet_driver_api::export_driver!(Crashy);
