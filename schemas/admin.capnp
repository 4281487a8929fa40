@0xf1a7c3e5b9d20846;
# capnet: the administrator's API, served by capnetd on its root-only Unix socket.
#
# The `capnet` CLI is a thin client of this interface. Every method that changes state is
# recorded in the audit trail. Errors carry a message meant for the administrator: what went
# wrong and what to do.

using Util = import "util.capnp";
using Policy = import "policy.capnp";
using Manifest = import "manifest.capnp";

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

  listGrants @12 (grain :Text, driver :Text) -> (grants :List(GrantInfo));
  # Every grant ever made (revoked ones too), optionally only a grain's or a driver's.

  revokeGrant @13 (grantId :Text, reason :Text) -> (wasLive :Bool);
  # Revokes a grant at once: its connections, listeners and mappings close, every later
  # call on anything derived from it fails with `revoked`, and its tokens stop restoring.

  audit @14 (filter :AuditFilter) -> (records :List(AuditRecord));
  # Audit records, oldest first (at most `filter.limit`, the newest ones).

  deleteGrain @15 (grainId :Text) -> (grants :UInt32, tokens :UInt32);
  # Stops the grain if it runs and deletes its grants, tokens, data and log.

  inspectDriver @16 (path :Text) -> (plugin :PluginInfo);
  # Reads the plugin file once and inspects it in a sandboxed driver host: what it says it
  # is, what it asks for, its size and SHA-256. Nothing is loaded into capnetd.

  approveDriver @17 (path :Text, name :Text, sha256 :Text) -> (plugin :PluginInfo);
  # Approves exactly the file whose SHA-256 is `sha256` (as inspect showed it) under
  # `name` (default: the plugin's name) with the privileges its manifest asks for: writes
  # the approval into the config and starts the driver. Fails if the file changed.

  revokeDriver @18 (name :Text, reason :Text) -> (grantsRevoked :UInt32);
  # Removes the driver's approval from the config, stops it and revokes all its grants.

  upgradeDriver @19 (name :Text, path :Text, sha256 :Text) -> (plugin :PluginInfo);
  # Replaces an approved driver's plugin with the file whose SHA-256 is `sha256`; its
  # grants stay and restore against the new version.

  driverApproval @20 (name :Text) -> (sha256 :Text, privileges :Manifest.Privileges, plugin :Text, running :PluginInfo, isRunning :Bool, signerKey :Text);
  # What is approved for a driver, and what its running plugin reported.

  reload @21 () -> (summary :Text);
  # Re-reads the config (as SIGHUP does). A broken config is refused with its line and
  # column and nothing changes; otherwise new drivers start, removed ones stop (their
  # grants are revoked), changed ones restart, and the rest is untouched.
}

struct PluginInfo {
  path @0 :Text;
  size @1 :UInt64;
  sha256 @2 :Text;
  name @3 :Text;
  version @4 :Text;
  abiMajor @5 :UInt16;
  abiMinor @6 :UInt16;
  manifest @7 :Manifest.Manifest;
  signature @8 :Text;
  # "unsigned", "signed by NAME (trusted key …)", "signed by an untrusted key …" or
  # "INVALID SIGNATURE: …".
  signerKey @9 :Text;
  # The ed25519 key that validly signed it (hex), if any.
}

struct GrantInfo {
  id @0 :Text;
  grain @1 :Text;
  driver @2 :Text;
  kind @3 :Text;
  # Interface and narrowing, such as "TcpPort smtp.example.test:587".
  constraints @4 :Text;
  # The extra rules and limits, as JSON.
  label @5 :Text;
  source @6 :Text;
  # "admin" or "rule:NAME".
  createdMs @7 :UInt64;
  lastUsedMs @8 :UInt64;
  bytesIn @9 :UInt64;
  bytesOut @10 :UInt64;
  openConnections @11 :UInt32;
  revokedMs @12 :UInt64;
  # 0 if live.
  revokeReason @13 :Text;
}

struct AuditFilter {
  grain @0 :Text;
  grant @1 :Text;
  kind @2 :Text;
  sinceMs @3 :UInt64;
  limit @4 :UInt32;
}

struct AuditRecord {
  timeMs @0 :UInt64;
  kind @1 :Text;
  grain @2 :Text;
  grant @3 :Text;
  driver @4 :Text;
  destination @5 :Text;
  rule @6 :Text;
  bytesIn @7 :UInt64;
  bytesOut @8 :UInt64;
  durationMs @9 :UInt64;
  detail @10 :Text;
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
