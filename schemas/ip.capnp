@0xf44732d435305f86;
# TCP/IP networking as capabilities: Sandstorm-compatible, written for capnet.
#
# Type IDs, names, method ordinals and parameter types match Sandstorm's `ip.capnp`, so a
# grain built from Sandstorm's schema works against capnet unchanged.
#
# In capnet every object here that a grain holds is a supervisor proxy: the supervisor
# forwards calls to the driver plugin that serves the grant, counts bytes, and fails every
# call with a `revoked` error once an administrator revokes the grant. Drivers apply the
# egress policy of the grant (deny-by-default for all but public unicast addresses).

using Util = import "util.capnp";
using SystemPersistent = import "system-persistent.capnp".SystemPersistent;

interface IpNetwork @0xa982576b7a2a2040 {
  # Outbound access to hosts on an IP network, limited by the grant's policy.

  struct PowerboxTag @0xcf9e3f33950df819 {
    # Tag value in a PowerboxDescriptor requesting an IpNetwork.

    encryption @0 :Encryption;

    struct Encryption @0xe2d94cf90fe4078d {
      union {
        none @0 :Void;
        tls @1 :Void;
        # Every TCP connection made through the network is wrapped in TLS by the driver
        # and verified against the system CA set.
      }
    }
  }

  getRemoteHost @0 (address :IpAddress) -> (host :IpRemoteHost);
  # Names a host by address. Fails at once if the policy forbids every port of it.

  getRemoteHostByName @1 (address :Text) -> (host :IpRemoteHost);
  # Names a host by DNS name or textual IP address (strict syntax: no octal, hex or dword
  # forms). The driver resolves the name itself and vets every address; a name whose
  # addresses are all denied fails as if it did not exist.
}

struct IpAddress @0xeeb98f9937d32c0b {
  # An IPv6 address as two big-endian halves: "1:2:3:4:5:6:7:8" has upper64
  # 0x0001000200030004 and lower64 0x0005000600070008. IPv4 addresses use the IPv4-mapped
  # form ::ffff:a.b.c.d.

  lower64 @0 :UInt64;
  upper64 @1 :UInt64;
}

interface IpInterface @0xe32c506ee93ed6fa {
  # Inbound access: the right to listen on ports of the driver's interface.

  listenTcp @0 (portNum :UInt16, port :TcpPort) -> (handle :Util.Handle);
  # Delivers every incoming connection on `portNum` to `port.connect()`. Dropping `handle`
  # stops listening at once; open connections stay until either side closes them.

  listenUdp @1 (portNum :UInt16, port :UdpPort) -> (handle :Util.Handle);
  # Delivers incoming datagrams on `portNum` to `port.send()`, whose `returnPort` answers
  # the remote peer. Dropping `handle` stops listening.
}

interface IpRemoteHost @0x905dd76b298b3130 {
  # One remote host; the policy still decides which ports it may be reached on.

  getTcpPort @0 (portNum :UInt16) -> (port :TcpPort);
  getUdpPort @1 (portNum :UInt16) -> (port :UdpPort);
}

interface TcpPort @0xeab20e1af07806b4 {
  # One remote TCP endpoint (or, passed to `listenTcp`, a grain's server).

  connect @0 (downstream :Util.ByteStream) -> (upstream :Util.ByteStream);
  # Opens a connection. The callee writes received bytes to `downstream`; the caller writes
  # bytes to send to `upstream` and may do so by pipelining before the call returns.
  # `done()` on either stream half-closes that direction. Releasing a stream without
  # `done()` aborts the connection.
}

interface UdpPort @0xc6212e1217d001ce {
  # One remote UDP endpoint.

  send @0 (message :Data, returnPort :UdpPort);
  # Sends one datagram; delivery is not guaranteed. Replies from the peer arrive at
  # `returnPort`. Reusing the same `returnPort` keeps the same local source port (a
  # NAT-like mapping that expires when idle).
}

struct IpPortPowerboxMetadata @0x856e71a6a4f22bba {
  # Tag value in a PowerboxDescriptor requesting a TcpPort or UdpPort.

  preferredPortNum @0 :UInt16;
  preferredHost @1 :Text;
}

interface PersistentIpNetwork @0xa5b3215660e038f2 extends(IpNetwork, SystemPersistent) {}
interface PersistentIpInterface @0xcf43ebe6a5a6f1b4 extends(IpInterface, SystemPersistent) {}
