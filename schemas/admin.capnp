@0xf1a7c3e5b9d20846;
# capnet: the administrator's API, served by capnetd on its root-only Unix socket.
#
# The `capnet` CLI is a thin client of this interface. Every method that changes state is
# recorded in the audit trail. Errors carry a message meant for the administrator: what went
# wrong and what to do.

using Util = import "util.capnp";
using Policy = import "policy.capnp";

interface Admin {
  startGrain @0 (spec :GrainSpec) -> (grain :GrainInfo);
  # Starts a grain. `spec.name` names a `[grains.NAME]` table of the config, or `spec.command`
  # gives an ad-hoc program. Fails if a grain with that id is already running.

  stopGrain @1 (grainId :Text, graceMs :UInt32) -> (grain :GrainInfo);
  # SIGTERM, then SIGKILL after `graceMs` (0 means the configured default). Returns when the
  # grain is gone.

  listGrains @2 () -> (grains :List(GrainInfo));
  grainStatus @3 (grainId :Text) -> (grain :GrainInfo);

  grainLogs @4 (grainId :Text, maxBytes :UInt64) -> (log :Data);
  # The last `maxBytes` of the grain's stdout and stderr.

  listRequests @5 () -> (requests :List(PowerboxRequest));
  # Pending powerbox requests, oldest first.

  grant @6 (requestId :UInt64, driver :Text, constraints :Constraints) -> (grantId :Text);
  # Answers a pending request with a capability from `driver`, narrowed by `constraints`.

  deny @7 (requestId :UInt64, reason :Text);
  # Fails a pending request; the grain sees `reason`.

  listDrivers @8 () -> (drivers :List(DriverStatus));

  waitForRequest @9 (timeoutMs :UInt32) -> (request :PowerboxRequest, found :Bool);
  # Waits until at least one request is pending (or the timeout passes) and returns the
  # oldest. For scripts and tests that answer requests as they come.

  waitGrain @10 (grainId :Text, timeoutMs :UInt32) -> (grain :GrainInfo, exited :Bool);
  # Waits until the grain has exited (or the timeout passes).

  shutdown @11 ();
  # Stops every grain and driver and exits the daemon.
}

struct GrainSpec {
  name @0 :Text;
  # A `[grains.NAME]` table of the config. The grain id is the name.

  id @1 :Text;
  # For ad-hoc grains: the id to use (generated if empty).

  command @2 :List(Text);
  # For ad-hoc grains: program and arguments.

  env @3 :List(Util.KeyValue);
  # Extra environment for the app.

  limits @4 :SandboxLimits;
  # Overrides of the configured limits for this start; a zero field keeps the
  # configured value (`[grains.ID]`, then `[grains.defaults]`, then the built-in default).
}

struct GrainInfo {
  id @0 :Text;
  state @1 :State;
  enum State {
    starting @0;
    running @1;
    stopping @2;
    exited @3;
  }
  pid @2 :Int32;
  startedAtMs @3 :UInt64;
  exitStatus @4 :Int32;
  # Exit code, or -signal if killed by a signal.
  exitReason @5 :Text;
  # For the administrator: how it ended, including an OOM kill and pids-limit hits.
  command @6 :List(Text);
  # As run inside the sandbox (an ad-hoc program appears as /app/<file>).

  limits @7 :SandboxLimits;
  # The limits the sandbox runs (or ran) with.

  usage @8 :SandboxUsage;
  # Cgroup accounting: live while running, final after the exit.

  uptimeMs @9 :UInt64;
  # Time since the start request (while running) or how long it ran (after the exit).

  exitCause @10 :Text;
  # Empty while running; then "exited", "signaled", "oom" (killed by the kernel's OOM
  # killer at the memory limit) or "failed" (the sandbox could not be set up).

  oomKilled @11 :Bool;
  # The OOM killer killed a process of the grain (the grain itself or a child).

  pidsLimitHit @12 :Bool;
  # A fork or thread creation failed at the pids limit at least once.

  hostUid @13 :UInt32;
  # The unprivileged host uid/gid the grain's uid 1000 maps to (kept across restarts).
}

struct SandboxLimits {
  # Resource limits of one sandbox. In a request, 0 means "the configured value".
  memoryBytes @0 :UInt64;
  pids @1 :UInt64;
  # Tasks (processes and threads) of the program.
  cpuMillis @2 :UInt64;
  # CPU quota in thousandths of a core; 0 (in a status) means unlimited.
  tmpBytes @3 :UInt64;
  # Size of /tmp and /dev/shm.
  nofile @4 :UInt64;
  fsizeBytes @5 :UInt64;
}

struct SandboxUsage {
  valid @0 :Bool;
  # False if the accounting could not be read.
  memoryBytes @1 :UInt64;
  pids @2 :UInt64;
  cpuUsageNs @3 :UInt64;
  oomKills @4 :UInt64;
  pidsLimitHits @5 :UInt64;
  # How often a fork failed at the pids limit.
}

struct PowerboxRequest {
  id @0 :UInt64;
  grainId @1 :Text;
  interfaceId @2 :UInt64;
  interfaceName @3 :Text;
  label @4 :Text;
  ageMs @5 :UInt64;
  preferredHost @6 :Text;
  preferredPort @7 :UInt16;
  encryption @8 :Text;
}

struct Constraints {
  rules @0 :List(Policy.Rule);
  # Extra rules for this grant, on top of the narrowing by the request itself.

  limits @1 :Policy.Limits;

  host @2 :Text;
  # For IpRemoteHost, TcpPort and UdpPort requests: the host, overriding preferredHost.

  port @3 :UInt16;
  # For TcpPort and UdpPort requests: the port, overriding preferredPortNum.
}

struct DriverStatus {
  name @0 :Text;
  state @1 :Text;
  # "running", "starting", "restarting", "failed" or "stopped".
  pid @2 :Int32;
  plugin @3 :Text;
  version @4 :Text;
  restarts @5 :UInt32;
  uptimeMs @6 :UInt64;
  lastError @7 :Text;
  openConnections @8 :UInt32;
  grants @9 :UInt32;
}
