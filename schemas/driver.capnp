@0xe7c3a95b1d4f2086;
# capnet: the protocol between the supervisor and a driver plugin.
#
# A driver host process loads one plugin and hands it a connected socket; the plugin (through
# driver-api's `serve`) offers `Driver` as its bootstrap capability. Only the supervisor holds
# it. The supervisor opens one `GrantSession` per grant and proxies every grain call into it;
# grains never hold driver capabilities directly.
#
# The ID of this file is the "driver protocol schema ID" in every plugin's magic block.

using Ip = import "ip.capnp";
using Policy = import "policy.capnp";
using Manifest = import "manifest.capnp";

interface Driver {
  start @0 (config :DriverConfig, events :EventSink) -> (manifest :Manifest.Manifest);
  # Called once, first. Configures the plugin with the administrator's settings. `events`
  # receives the plugin's audit events for as long as the driver runs. Fails with a message
  # for the administrator if the options are invalid.

  health @1 () -> (status :Health);
  # Must answer within the supervisor's health deadline; a driver that does not is killed
  # and restarted.

  openGrant @2 (spec :GrantSpec) -> (session :GrantSession);
  # Opens the driver side of one grant. Everything reachable from the session obeys the
  # grant's policy and limits. Releasing the session (or calling `revoke`) closes every
  # connection, listener and UDP mapping made through it.
}

struct DriverConfig {
  name @0 :Text;
  # The administrator's name for this driver instance (the config table key).

  optionsToml @1 :Text;
  # The `[drivers.NAME.options]` table as TOML; the plugin parses it into its own type.

  policy @2 :Policy.Policy;
  # Driver-wide rules from the administrator, applied under every grant's own rules.

  privileges @3 :Manifest.Privileges;
  # The privileges the administrator approved; the plugin must not use others.

  listenAddresses @4 :List(Text);
  # Local addresses that listeners bind to (for example "127.0.0.1" or "::").
}

struct GrantSpec {
  grantId @0 :Text;
  grainId @1 :Text;
  encryption @2 :Encryption;
  enum Encryption {
    none @0;
    tls @1;
  }
  policy @3 :Policy.Policy;
  limits @4 :Policy.Limits;

  scopeHost @5 :Text;
  # For grants narrower than IpNetwork: the only host reachable (a name or a textual IP
  # address, compared after normalisation). Empty means any host. The scope only narrows:
  # the policy still vets every address the host resolves to.

  scopePort @6 :UInt16;
  # For TcpPort and UdpPort grants: the only port reachable. Zero means any port.
}

struct Health {
  uptimeMs @0 :UInt64;
  openConnections @1 :UInt32;
  openListeners @2 :UInt32;
  grants @3 :UInt32;
}

interface GrantSession {
  # The driver side of one grant.

  network @0 () -> (network :Ip.IpNetwork);
  # Outbound access under the grant's policy.

  interface @1 () -> (interface :Ip.IpInterface);
  # Inbound access under the grant's policy.

  revoke @2 (reason :Text);
  # Closes every connection, listener and mapping of the grant at once; later calls on
  # anything derived from the session fail with a `revoked` error.

  stats @3 () -> (stats :GrantStats);
}

struct GrantStats {
  bytesIn @0 :UInt64;
  bytesOut @1 :UInt64;
  openConnections @2 :UInt32;
  openListeners @3 :UInt32;
  connectionsTotal @4 :UInt64;
  refusals @5 :UInt64;
}

interface EventSink {
  # Where a driver reports audit events. The supervisor stamps each with the time and the
  # driver's name and stores it; it is not told to the grain.

  report @0 (event :DriverEvent) -> stream;
}

struct DriverEvent {
  grantId @0 :Text;
  kind @1 :Kind;
  enum Kind {
    connectAllowed @0;
    connectRefused @1;
    connectionClosed @2;
    listenStarted @3;
    listenStopped @4;
    limitHit @5;
    datagramRefused @6;
    mediationRefused @7;
    # A protocol driver (smtp, http) refused something the grain said.
    other @8;
  }
  destination @2 :Text;
  # host:port or address:port, as far as known.

  rule @3 :Text;
  # The deciding rule's label, or the default that applied.

  bytesIn @4 :UInt64;
  bytesOut @5 :UInt64;
  durationMs @6 :UInt64;
  detail @7 :Text;
}
