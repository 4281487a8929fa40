@0xf6c200ab14cd53e4;
# Sandstorm-compatible powerbox descriptor, written for capnet.
#
# A grain describes the capability it wants as a PowerboxDescriptor. Each tag names an
# interface by its type ID and may carry a value that narrows the request: for IpNetwork
# the value is an `IpNetwork.PowerboxTag`, for TcpPort and UdpPort an
# `IpPortPowerboxMetadata`. Type IDs and ordinals match Sandstorm's `powerbox.capnp`.

using Util = import "util.capnp";

struct PowerboxDescriptor @0xedcf0fa3bfc71c58 {
  tags @0 :List(Tag);
  # Every tag must be satisfied by the granted capability.

  struct Tag @0xbe3d16a8df03c418 {
    id @0 :UInt64;
    # The type ID of the requested interface (for example IpNetwork's 0xa982576b7a2a2040).

    value @1 :AnyPointer;
    # An optional struct narrowing the request; its type depends on `id`.
  }

  quality @1 :MatchQuality = acceptable;

  enum MatchQuality {
    preferred @1;
    acceptable @0;
    unacceptable @2;
  }
}

struct PowerboxDisplayInfo @0xa553a209bee32bec {
  title @0 :Util.LocalizedText;
  verbPhrase @1 :Util.LocalizedText;
  description @2 :Util.LocalizedText;
}
