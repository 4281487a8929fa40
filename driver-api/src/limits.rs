//! Per-grant limits: how many connections and listeners a grant may hold, how fast it may
//! open connections and send datagrams, how large a datagram may be, and how many bytes
//! per second may flow in each direction.
//!
//! [`Limits`] is the configuration (`policy.capnp` `Limits`, or TOML); zero means "no
//! limit of this kind". A driver makes one [`GrantLimiter`] per grant and shares it (it is
//! a cheap clone) among all the grant's connections:
//!
//! * [`GrantLimiter::open_connection`] and [`GrantLimiter::open_listener`] return RAII
//!   permits; the count goes down when the permit is dropped, so a connection's permit
//!   should live exactly as long as the connection;
//! * new connections are also limited per second by a token bucket whose burst is one
//!   second's worth;
//! * [`GrantLimiter::check_datagram`] checks a UDP datagram's size and rate;
//! * [`ByteThrottle::acquire`] paces data: call it before writing (or after reading) `n`
//!   bytes and it sleeps on the tokio clock just long enough to keep the grant's rate,
//!   with a burst of one second's worth. It works on a current-thread runtime and returns
//!   at once, without locking, when unlimited.
//!
//! Every refusal is a [`LimitError`] that names the limit and its value.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use capnet_schemas::policy_capnp;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Per-grant limits; zero means "no limit of this kind".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent TCP connections, outbound and accepted together.
    pub max_connections: u32,
    /// New connections per second (burst: the same number).
    pub connections_per_second: u32,
    /// Bytes per second in each direction (burst: one second's worth).
    pub bytes_per_second: u64,
    /// UDP datagrams per second, sent (burst: the same number).
    pub udp_packets_per_second: u32,
    /// The largest UDP payload, in bytes.
    pub udp_max_packet_size: u32,
    /// Concurrent listeners (TCP and UDP together).
    pub max_listeners: u32,
}

impl Limits {
    /// No limits at all.
    pub const UNLIMITED: Self = Self {
        max_connections: 0,
        connections_per_second: 0,
        bytes_per_second: 0,
        udp_packets_per_second: 0,
        udp_max_packet_size: 0,
        max_listeners: 0,
    };

    /// Reads the limits from a `policy.capnp` `Limits`.
    pub fn read_capnp(reader: policy_capnp::limits::Reader<'_>) -> Self {
        Self {
            max_connections: reader.get_max_connections(),
            connections_per_second: reader.get_connections_per_second(),
            bytes_per_second: reader.get_bytes_per_second(),
            udp_packets_per_second: reader.get_udp_packets_per_second(),
            udp_max_packet_size: reader.get_udp_max_packet_size(),
            max_listeners: reader.get_max_listeners(),
        }
    }

    /// Writes the limits into a `policy.capnp` `Limits`.
    pub fn write_capnp(&self, mut builder: policy_capnp::limits::Builder<'_>) {
        builder.set_max_connections(self.max_connections);
        builder.set_connections_per_second(self.connections_per_second);
        builder.set_bytes_per_second(self.bytes_per_second);
        builder.set_udp_packets_per_second(self.udp_packets_per_second);
        builder.set_udp_max_packet_size(self.udp_max_packet_size);
        builder.set_max_listeners(self.max_listeners);
    }
}

/// A limit was hit. Each message names the limit and its value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// `max_connections`.
    #[error("too many concurrent connections: the grant allows {max}")]
    Connections {
        /// The limit.
        max: u32,
    },
    /// `connections_per_second`.
    #[error("too many new connections: the grant allows {per_second} per second")]
    ConnectionRate {
        /// The limit.
        per_second: u32,
    },
    /// `max_listeners`.
    #[error("too many listeners: the grant allows {max}")]
    Listeners {
        /// The limit.
        max: u32,
    },
    /// `udp_max_packet_size`.
    #[error("datagram of {size} bytes is too large: the grant allows at most {max} bytes")]
    DatagramSize {
        /// The datagram's size.
        size: usize,
        /// The limit.
        max: u32,
    },
    /// `udp_packets_per_second`.
    #[error("too many datagrams: the grant allows {per_second} per second")]
    DatagramRate {
        /// The limit.
        per_second: u32,
    },
}

/// Fixed-point scale: one token is this many units, so refills are exact integers
/// (one unit per token per nanosecond of rate).
const UNITS_PER_TOKEN: u128 = 1_000_000_000;

fn elapsed_nanos(from: Instant, to: Instant) -> u128 {
    to.saturating_duration_since(from).as_nanos()
}

/// A token bucket: `per_second` tokens are added each second, continuously, up to
/// `burst`; it starts full. Time is passed in, so it can be driven by any clock.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    per_second: u128,
    capacity: u128,
    level: u128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_second: u64, burst: u64, now: Instant) -> Self {
        let capacity = u128::from(burst) * UNITS_PER_TOKEN;
        Self {
            per_second: u128::from(per_second),
            capacity,
            level: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let added = elapsed_nanos(self.last, now).saturating_mul(self.per_second);
        self.level = self.level.saturating_add(added).min(self.capacity);
        if now > self.last {
            self.last = now;
        }
    }

    /// Takes `n` tokens if there are that many, else takes nothing and returns `false`.
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let needed = u128::from(n) * UNITS_PER_TOKEN;
        if self.level >= needed {
            self.level -= needed;
            true
        } else {
            false
        }
    }

    /// Whole tokens available now.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        u64::try_from(self.level / UNITS_PER_TOKEN).unwrap_or(u64::MAX)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state is plain numbers that are always consistent; a panic elsewhere while the
    // lock was held does not make them unusable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Paces a byte stream (or several sharing one budget) to a rate, with a burst of one
/// second's worth. Callers take the bytes first and then wait off the debt, so a large
/// write is never refused, only delayed, and callers are served in the order they came.
#[derive(Debug)]
pub struct ByteThrottle {
    per_second: u64,
    /// `None` when unlimited.
    state: Option<Mutex<ThrottleState>>,
}

#[derive(Debug)]
struct ThrottleState {
    /// Units available; negative while callers wait off a debt.
    level: i128,
    last: Instant,
}

impl ByteThrottle {
    /// A throttle at `per_second` bytes per second; 0 means unlimited.
    pub fn new(per_second: u64) -> Self {
        let state = (per_second > 0).then(|| {
            Mutex::new(ThrottleState {
                level: i128::from(per_second) * UNITS_PER_TOKEN as i128,
                last: Instant::now(),
            })
        });
        Self { per_second, state }
    }

    /// The rate in bytes per second; 0 means unlimited.
    pub fn per_second(&self) -> u64 {
        self.per_second
    }

    /// Accounts for `n` bytes and sleeps until they fit the rate. Returns at once when
    /// unlimited or within the burst. If the future is dropped while sleeping, the bytes
    /// stay accounted for.
    pub async fn acquire(&self, n: usize) {
        if let Some(wait) = self.reserve(n, Instant::now()) {
            tokio::time::sleep_until(wait).await;
        }
    }

    /// Takes `n` bytes from the budget and returns when the debt will be paid off, if
    /// there is one.
    fn reserve(&self, n: usize, now: Instant) -> Option<Instant> {
        let state = self.state.as_ref()?;
        let per_second = i128::from(self.per_second);
        let capacity = per_second * UNITS_PER_TOKEN as i128;
        let mut state = lock(state);
        let elapsed = i128::try_from(elapsed_nanos(state.last, now)).unwrap_or(i128::MAX);
        state.level = state
            .level
            .saturating_add(elapsed.saturating_mul(per_second))
            .min(capacity);
        if now > state.last {
            state.last = now;
        }
        let bytes = i128::try_from(n).unwrap_or(i128::MAX);
        state.level = state
            .level
            .saturating_sub(bytes.saturating_mul(UNITS_PER_TOKEN as i128));
        if state.level >= 0 {
            return None;
        }
        // Ceiling division: the debt is paid off after this many nanoseconds.
        let debt = -state.level;
        let nanos = (debt + per_second - 1) / per_second;
        let wait = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        Some(now + wait)
    }
}

#[derive(Debug)]
struct LimiterState {
    limits: Limits,
    connections: AtomicU32,
    listeners: AtomicU32,
    connection_rate: Option<Mutex<TokenBucket>>,
    datagram_rate: Option<Mutex<TokenBucket>>,
    outbound: ByteThrottle,
    inbound: ByteThrottle,
}

/// The limits of one grant, enforced; clones share the counters and budgets.
#[derive(Clone, Debug)]
pub struct GrantLimiter {
    state: Arc<LimiterState>,
}

fn bucket(per_second: u32, now: Instant) -> Option<Mutex<TokenBucket>> {
    (per_second > 0).then(|| {
        Mutex::new(TokenBucket::new(
            u64::from(per_second),
            u64::from(per_second),
            now,
        ))
    })
}

/// Increments `counter` unless it is at `max` (0: no maximum).
fn try_increment(counter: &AtomicU32, max: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (max == 0 || n < max).then(|| n.saturating_add(1))
        })
        .is_ok()
}

impl GrantLimiter {
    /// Enforces `limits`.
    pub fn new(limits: Limits) -> Self {
        let now = Instant::now();
        Self {
            state: Arc::new(LimiterState {
                limits,
                connections: AtomicU32::new(0),
                listeners: AtomicU32::new(0),
                connection_rate: bucket(limits.connections_per_second, now),
                datagram_rate: bucket(limits.udp_packets_per_second, now),
                outbound: ByteThrottle::new(limits.bytes_per_second),
                inbound: ByteThrottle::new(limits.bytes_per_second),
            }),
        }
    }

    /// The limits being enforced.
    pub fn limits(&self) -> Limits {
        self.state.limits
    }

    /// Admits one new connection (outbound or accepted): checks the concurrent maximum,
    /// then the rate. The returned permit holds the connection's place until dropped.
    pub fn open_connection(&self) -> Result<ConnectionPermit, LimitError> {
        let limits = &self.state.limits;
        if !try_increment(&self.state.connections, limits.max_connections) {
            return Err(LimitError::Connections {
                max: limits.max_connections,
            });
        }
        let permit = ConnectionPermit {
            state: Arc::clone(&self.state),
        };
        if let Some(rate) = &self.state.connection_rate
            && !lock(rate).try_take(1, Instant::now())
        {
            // Dropping the permit gives the place back.
            drop(permit);
            return Err(LimitError::ConnectionRate {
                per_second: limits.connections_per_second,
            });
        }
        Ok(permit)
    }

    /// Admits one new listener. The returned permit holds its place until dropped.
    pub fn open_listener(&self) -> Result<ListenerPermit, LimitError> {
        let max = self.state.limits.max_listeners;
        if !try_increment(&self.state.listeners, max) {
            return Err(LimitError::Listeners { max });
        }
        Ok(ListenerPermit {
            state: Arc::clone(&self.state),
        })
    }

    /// Checks one outgoing UDP datagram of `size` bytes: first its size, then the rate (a
    /// datagram that is too large does not use up the rate).
    pub fn check_datagram(&self, size: usize) -> Result<(), LimitError> {
        let limits = &self.state.limits;
        let max = limits.udp_max_packet_size;
        if max > 0 && usize::try_from(max).is_ok_and(|m| size > m) {
            return Err(LimitError::DatagramSize { size, max });
        }
        if let Some(rate) = &self.state.datagram_rate
            && !lock(rate).try_take(1, Instant::now())
        {
            return Err(LimitError::DatagramRate {
                per_second: limits.udp_packets_per_second,
            });
        }
        Ok(())
    }

    /// The throttle for bytes the grain sends.
    pub fn outbound_bytes(&self) -> &ByteThrottle {
        &self.state.outbound
    }

    /// The throttle for bytes the grain receives.
    pub fn inbound_bytes(&self) -> &ByteThrottle {
        &self.state.inbound
    }

    /// Connections currently open.
    pub fn connections(&self) -> u32 {
        self.state.connections.load(Ordering::Acquire)
    }

    /// Listeners currently open.
    pub fn listeners(&self) -> u32 {
        self.state.listeners.load(Ordering::Acquire)
    }
}

/// One open connection's place in the grant's limit; released when dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    state: Arc<LimiterState>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.state.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open listener's place in the grant's limit; released when dropped.
#[derive(Debug)]
pub struct ListenerPermit {
    state: Arc<LimiterState>,
}

impl Drop for ListenerPermit {
    fn drop(&mut self) {
        self.state.listeners.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// The bucket starts full, refuses when empty without taking anything, refills
    /// continuously and exactly, and never holds more than its burst.
    #[test]
    fn token_bucket_refills_exactly_and_caps_at_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(3, 3, t0);
        assert!(bucket.try_take(3, t0));
        assert!(!bucket.try_take(1, t0));
        // 3 per second: one token every 333.33 ms.
        let almost = t0 + Duration::from_nanos(333_333_333);
        assert!(
            !bucket.try_take(1, almost),
            "999_999_999 units are not a token"
        );
        assert!(bucket.try_take(1, t0 + Duration::from_nanos(333_333_334)));
        assert!(!bucket.try_take(1, t0 + Duration::from_nanos(333_333_334)));
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(bucket.available(later), 3, "capped at the burst");
        assert!(
            !bucket.try_take(4, later),
            "more than the burst is never possible"
        );
        assert_eq!(bucket.available(later), 3, "a refused take takes nothing");
        assert_eq!(bucket.available(t0), 3, "time going backwards adds nothing");
    }

    /// Permits count connections and listeners and give their place back when dropped.
    #[tokio::test]
    async fn permits_release_on_drop() {
        let limiter = GrantLimiter::new(Limits {
            max_connections: 2,
            max_listeners: 1,
            ..Limits::UNLIMITED
        });
        let a = limiter.open_connection().unwrap();
        let b = limiter.clone().open_connection().unwrap();
        assert_eq!(limiter.connections(), 2);
        let err = limiter.open_connection().unwrap_err();
        assert_eq!(err, LimitError::Connections { max: 2 });
        assert_eq!(
            err.to_string(),
            "too many concurrent connections: the grant allows 2"
        );
        drop(a);
        assert_eq!(limiter.connections(), 1);
        let c = limiter.open_connection().unwrap();
        drop((b, c));
        assert_eq!(limiter.connections(), 0);

        let l = limiter.open_listener().unwrap();
        assert_eq!(
            limiter.open_listener().unwrap_err().to_string(),
            "too many listeners: the grant allows 1"
        );
        drop(l);
        assert!(limiter.open_listener().is_ok());
    }

    /// Unlimited still counts, never refuses.
    #[tokio::test]
    async fn unlimited_never_refuses() {
        let limiter = GrantLimiter::new(Limits::UNLIMITED);
        let permits: Vec<_> = (0..1000)
            .map(|_| limiter.open_connection().unwrap())
            .collect();
        assert_eq!(limiter.connections(), 1000);
        drop(permits);
        assert_eq!(limiter.connections(), 0);
        for _ in 0..1000 {
            limiter.check_datagram(65_507).unwrap();
        }
    }

    /// The connection rate refuses beyond the burst and recovers with time; a refused
    /// connection does not hold a place.
    #[tokio::test(start_paused = true)]
    async fn connection_rate_on_the_paused_clock() {
        let limiter = GrantLimiter::new(Limits {
            connections_per_second: 2,
            ..Limits::UNLIMITED
        });
        let _a = limiter.open_connection().unwrap();
        let _b = limiter.open_connection().unwrap();
        let err = limiter.open_connection().unwrap_err();
        assert_eq!(err, LimitError::ConnectionRate { per_second: 2 });
        assert_eq!(
            err.to_string(),
            "too many new connections: the grant allows 2 per second"
        );
        assert_eq!(
            limiter.connections(),
            2,
            "the refused one gave its place back"
        );
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(limiter.open_connection().is_err());
        tokio::time::advance(MS).await;
        assert!(limiter.open_connection().is_ok());
    }

    /// Datagrams: too large is refused first and does not use the rate.
    #[tokio::test(start_paused = true)]
    async fn datagram_size_and_rate() {
        let limiter = GrantLimiter::new(Limits {
            udp_max_packet_size: 512,
            udp_packets_per_second: 2,
            ..Limits::UNLIMITED
        });
        let err = limiter.check_datagram(513).unwrap_err();
        assert_eq!(
            err,
            LimitError::DatagramSize {
                size: 513,
                max: 512
            }
        );
        assert_eq!(
            err.to_string(),
            "datagram of 513 bytes is too large: the grant allows at most 512 bytes"
        );
        limiter.check_datagram(512).unwrap();
        limiter.check_datagram(0).unwrap();
        assert_eq!(
            limiter.check_datagram(1),
            Err(LimitError::DatagramRate { per_second: 2 })
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        limiter.check_datagram(1).unwrap();
    }

    async fn timed(throttle: &ByteThrottle, n: usize) -> Duration {
        let start = Instant::now();
        throttle.acquire(n).await;
        start.elapsed()
    }

    fn assert_about(got: Duration, want: Duration) {
        // The timer wheel has millisecond resolution.
        assert!(
            got >= want && got <= want + 2 * MS,
            "waited {got:?}, expected {want:?}"
        );
    }

    /// The throttle lets a second's worth through at once, then paces to the rate; a
    /// write larger than the burst is delayed, not refused; idle time refills at most one
    /// second's worth.
    #[tokio::test(start_paused = true)]
    async fn throttle_paces_on_the_paused_clock() {
        let throttle = ByteThrottle::new(1000);
        assert_about(timed(&throttle, 1000).await, Duration::ZERO);
        assert_about(timed(&throttle, 500).await, Duration::from_millis(500));
        assert_about(timed(&throttle, 1500).await, Duration::from_millis(1500));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_about(timed(&throttle, 3000).await, Duration::from_secs(2));
    }

    /// Several streams sharing one grant's budget get the rate together, in order.
    #[tokio::test(start_paused = true)]
    async fn throttle_is_shared_fairly() {
        let limiter = GrantLimiter::new(Limits {
            bytes_per_second: 100,
            ..Limits::UNLIMITED
        });
        let start = Instant::now();
        let task = |id: u8| {
            let limiter = limiter.clone();
            async move {
                let mut done = Vec::new();
                for _ in 0..5 {
                    limiter.outbound_bytes().acquire(50).await;
                    done.push((id, start.elapsed()));
                }
                done
            }
        };
        let (a, b) = tokio::join!(task(1), task(2));
        // 500 bytes at 100/s with a 100-byte burst: after the burst, one 50-byte chunk
        // every 500 ms in total, whoever sends it, so the last finishes after 4 s.
        let mut times: Vec<Duration> = a.iter().chain(&b).map(|(_, t)| *t).collect();
        times.sort();
        let want = [0, 0, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000];
        for (got, want) in times.iter().zip(want) {
            assert_about(*got, Duration::from_millis(want));
        }
        // Requests are served in order, so neither stream starves: the second stream's
        // first chunk goes before the first stream's last.
        assert!(b[0].1 < a[4].1, "{a:?} {b:?}");
        // The inbound direction has its own budget.
        assert_about(timed(limiter.inbound_bytes(), 100).await, Duration::ZERO);
    }

    /// Unlimited throttles return at once and never touch the timer.
    #[tokio::test(start_paused = true)]
    async fn unlimited_throttle_is_free() {
        let throttle = ByteThrottle::new(0);
        let start = Instant::now();
        for _ in 0..1000 {
            throttle.acquire(usize::MAX).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(throttle.state.is_none());
    }

    /// The throttle works on a current-thread runtime inside a LocalSet, as drivers run.
    #[test]
    fn throttle_on_a_local_set() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        let elapsed = local.block_on(&runtime, async {
            let throttle = std::rc::Rc::new(ByteThrottle::new(10));
            let other = std::rc::Rc::clone(&throttle);
            let start = Instant::now();
            let handle = tokio::task::spawn_local(async move { other.acquire(20).await });
            throttle.acquire(10).await;
            handle.await.unwrap();
            start.elapsed()
        });
        // 30 bytes at 10/s with a 10-byte burst: 2 s.
        assert_about(elapsed, Duration::from_secs(2));
    }

    /// Limits round-trip through Cap'n Proto and TOML (zero or absent means unlimited).
    #[test]
    fn limits_round_trip() {
        let limits = Limits {
            max_connections: 1,
            connections_per_second: 2,
            bytes_per_second: 3,
            udp_packets_per_second: 4,
            udp_max_packet_size: 5,
            max_listeners: 6,
        };
        let mut message = capnp::message::Builder::new_default();
        limits.write_capnp(message.init_root());
        let reader = message
            .get_root_as_reader::<policy_capnp::limits::Reader<'_>>()
            .unwrap();
        assert_eq!(Limits::read_capnp(reader), limits);
        let text = toml::to_string(&limits).unwrap();
        assert_eq!(toml::from_str::<Limits>(&text).unwrap(), limits);
        let partial: Limits = toml::from_str("max_connections = 10").unwrap();
        assert_eq!(
            partial,
            Limits {
                max_connections: 10,
                ..Limits::UNLIMITED
            }
        );
        let err = toml::from_str::<Limits>("max_conections = 10").unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }
}
