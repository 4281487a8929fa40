@0xb2f4d6e81a3c5079;
# capnet: the API a grain sees on file descriptor 3.
#
# A grain starts with a Cap'n Proto two-party connection on fd 3 whose bootstrap capability
# is `GrainApi`. It is the grain's only way to the network: it asks for capabilities through
# the powerbox, saves them, and restores them after a restart.

using Powerbox = import "powerbox.capnp";
using Ip = import "ip.capnp";
using SystemPersistent = import "system-persistent.capnp".SystemPersistent;

interface GrainApi {
  request @0 (descriptor :Powerbox.PowerboxDescriptor, label :Text)
          -> (cap :Capability, grantId :Text);
  # Asks the administrator for a capability matching `descriptor` (the first tag names the
  # interface: IpNetwork, IpInterface, IpRemoteHost, TcpPort or UdpPort). `label` says why,
  # in the grain's words; the administrator sees it. Waits until the request is granted
  # (by `capnet powerbox grant` or a configured rule), denied (fails with the reason) or
  # expires (fails with "expired"). The result implements the requested interface and
  # SystemPersistent.

  restore @1 (token :Data) -> (cap :Capability);
  # Restores a capability from a token that this grain got from `save()`. Fails if the token
  # is unknown, belongs to another grain, was dropped, or its grant was revoked.

  drop @2 (token :Data);
  # Forgets a saved token. Live capabilities stay usable until released.

  whoami @3 () -> (grainId :Text);
}

interface PersistentIpRemoteHost extends(Ip.IpRemoteHost, SystemPersistent) {}
interface PersistentTcpPort extends(Ip.TcpPort, SystemPersistent) {}
interface PersistentUdpPort extends(Ip.UdpPort, SystemPersistent) {}
