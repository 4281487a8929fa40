@0x9b1e3c5a7d2f4e61;
# capnet: what a driver plugin says about itself.
#
# Every plugin embeds one Manifest (as a flat Cap'n Proto message) in its magic block. The
# supervisor reads it in a sandboxed helper, shows it to the administrator on `capnet driver
# inspect`, pins the approval to it, and never grants a privilege the approval lacks.

struct Manifest {
  name @0 :Text;
  # Short plugin name, such as "tcp". Lower-case letters, digits and '-'.

  version @1 :Text;
  # Semantic version of the plugin, such as "1.2.0".

  description @2 :Text;
  # One line for the administrator.

  provides @3 :List(Provided);
  # The ip.capnp interfaces this plugin serves.

  privileges @4 :Privileges;
  # What the plugin needs from the host. Only approved privileges are ever given.

  author @5 :Text;

  struct Provided {
    interfaceId @0 :UInt64;
    # Type ID of the interface, such as IpNetwork's 0xa982576b7a2a2040.

    name @1 :Text;
    # Its name, such as "IpNetwork", for display.

    protocols @2 :List(Text);
    # Application protocols spoken through it, such as ["tcp"], ["smtp"], ["http", "https"].
  }
}

struct Privileges {
  outboundTcp @0 :Bool;
  # Opens TCP connections to hosts the policy allows.

  outboundUdp @1 :Bool;
  # Sends UDP datagrams to hosts the policy allows.

  inboundTcp @2 :Bool;
  # Listens for TCP connections.

  inboundUdp @3 :Bool;
  # Receives UDP datagrams on bound ports.

  lowPorts @4 :Bool;
  # Binds ports below 1024 (CAP_NET_BIND_SERVICE inside the driver host).

  dns @5 :Bool;
  # Resolves host names (reads /etc/resolv.conf and /etc/hosts).
}
