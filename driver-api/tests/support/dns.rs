//! A minimal authoritative DNS responder on `127.0.0.1` (an ephemeral UDP port) whose
//! answers a test can change between queries. It answers A and AAAA queries from a
//! table, NXDOMAIN for names it does not know, and SERVFAIL for names marked so. It
//! counts the queries it sees, so a test can prove how many lookups were made.
//!
//! The message encoding is hickory-proto's (re-exported by hickory-resolver), so the
//! responder is a few lines of logic on a well-tested codec.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use capnet_driver_api::resolve::{Resolver, ResolverOptions};
use hickory_resolver::proto::op::{Message, OpCode, ResponseCode};
use hickory_resolver::proto::rr::{RData, Record, RecordType};

/// What the server answers for one name.
#[derive(Clone, Debug)]
enum Entry {
    /// These addresses, with this TTL.
    Addrs(Vec<IpAddr>, u32),
    /// SERVFAIL.
    ServFail,
}

#[derive(Default)]
struct State {
    zone: HashMap<String, Entry>,
    /// Queries seen per lower-case name (without the trailing dot).
    queries: HashMap<String, usize>,
}

/// The running server; stops when dropped.
pub struct TestDns {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestDns {
    /// Binds `127.0.0.1:0` and starts answering.
    pub fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the test dns socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("set a read timeout");
        let addr = socket.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || serve(&socket, &state, &stop))
        };
        Self {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers `name` with these addresses (TTL 0, so nothing caches them).
    pub fn set(&self, name: &str, addrs: &[&str]) {
        self.set_with_ttl(name, addrs, 0);
    }

    /// Answers `name` with these addresses and TTL.
    pub fn set_with_ttl(&self, name: &str, addrs: &[&str], ttl: u32) {
        let addrs = addrs
            .iter()
            .map(|a| a.parse().expect("a test address"))
            .collect();
        self.state
            .lock()
            .expect("dns state")
            .zone
            .insert(key(name), Entry::Addrs(addrs, ttl));
    }

    /// Answers `name` with SERVFAIL.
    pub fn set_servfail(&self, name: &str) {
        self.state
            .lock()
            .expect("dns state")
            .zone
            .insert(key(name), Entry::ServFail);
    }

    /// How many queries (of any type) the server has seen for `name`.
    pub fn queries(&self, name: &str) -> usize {
        let state = self.state.lock().expect("dns state");
        state.queries.get(&key(name)).copied().unwrap_or(0)
    }

    /// Options for a resolver that asks only this server, without caching.
    pub fn options(&self) -> ResolverOptions {
        ResolverOptions {
            timeout: Some(Duration::from_secs(2)),
            attempts: Some(0),
            cache_max_ttl: Duration::ZERO,
            ..ResolverOptions::with_nameservers(vec![self.addr])
        }
    }

    /// A resolver that asks only this server, without caching.
    pub fn resolver(&self) -> Resolver {
        Resolver::new(&self.options()).expect("build the test resolver")
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn serve(socket: &UdpSocket, state: &Mutex<State>, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((len, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(request) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let response = answer(&request, state);
        if let Ok(bytes) = response.to_vec() {
            let _ = socket.send_to(&bytes, peer);
        }
    }
}

fn answer(request: &Message, state: &Mutex<State>) -> Message {
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    let mut state = state.lock().expect("dns state");
    for query in &request.queries {
        response.add_query(query.clone());
        let name = key(&query.name().to_ascii());
        *state.queries.entry(name.clone()).or_default() += 1;
        match state.zone.get(&name) {
            None => response.metadata.response_code = ResponseCode::NXDomain,
            Some(Entry::ServFail) => response.metadata.response_code = ResponseCode::ServFail,
            Some(Entry::Addrs(addrs, ttl)) => {
                for addr in addrs {
                    let wanted = match addr {
                        IpAddr::V4(_) => RecordType::A,
                        IpAddr::V6(_) => RecordType::AAAA,
                    };
                    if query.query_type() == wanted {
                        response.add_answer(Record::from_rdata(
                            query.name().clone(),
                            *ttl,
                            RData::from(*addr),
                        ));
                    }
                }
            }
        }
    }
    response
}
