@0xc4a1f7e93b2d5c08;
# capnet: egress policy and per-grant limits, as the supervisor hands them to a driver.
#
# The policy engine lives in driver-api, so every driver enforces the same rules: deny by
# default every address that is not public unicast, then apply the rules below, where the
# most specific matching rule wins and deny wins ties.

struct Policy {
  rules @0 :List(Rule);
}

struct Rule {
  action @0 :Action;
  enum Action {
    allow @0;
    deny @1;
  }

  hosts @1 :List(Text);
  # Host patterns: exact names ("mail.example.test") or suffixes ("*.example.test").
  # Matched case-insensitively after IDNA normalisation. Empty means any host.

  cidrs @2 :List(Text);
  # Address ranges, such as "127.0.0.1/32" or "2001:db8::/32". Empty means any address.

  ports @3 :List(PortRange);
  # Port ranges. Empty means any port.

  direction @4 :Direction;
  enum Direction {
    outbound @0;
    inbound @1;
    both @2;
  }

  label @5 :Text;
  # Shown in audit events as the deciding rule.
}

struct PortRange {
  first @0 :UInt16;
  last @1 :UInt16;
}

struct Limits {
  # Per-grant limits. Zero means "no limit of this kind".

  maxConnections @0 :UInt32;
  # Concurrent TCP connections (outbound and accepted).

  connectionsPerSecond @1 :UInt32;
  # New connections per second (token bucket, burst of the same size).

  bytesPerSecond @2 :UInt64;
  # Throughput in each direction.

  udpPacketsPerSecond @3 :UInt32;
  udpMaxPacketSize @4 :UInt32;
  maxListeners @5 :UInt32;
}
