@0xa0d5b8e2c4f61937;
# Sandstorm's `SystemPersistent` (from its supervisor.capnp), restated for capnet with
# Sandstorm's type IDs, ordinals and parameter types. Granted capabilities implement it:
# `save()` returns the token as `Data`.

using Persistent = import "persistent.capnp".Persistent;
using Util = import "util.capnp";

interface SystemPersistent @0xc38cedd77cbed5b4 extends(Persistent(Data, ApiTokenOwner)) {
  interface RevocationObserver @0xcdda9d1436d7d206 {
    dropWhenRevoked @0 (handle :Util.Handle);
  }

  addRequirements @0 (requirements :List(MembraneRequirement), observer :RevocationObserver)
                  -> (cap :SystemPersistent);
  # Sandstorm's conditional-revocation hook. capnet revokes through its own grant records
  # instead and answers this method with `unimplemented`.
}

struct MembraneRequirement @0x918db9a721f13886 {
  # A condition under which a capability stays valid (Sandstorm). Declared for wire
  # compatibility of `addRequirements`; capnet does not evaluate it.

  union {
    tokenValid @0 :Text;
    permissionsHeld :group {
      union {
        accountId @5 :Text;
        tokenId @6 :Text;
      }
      grainId @2 :Text;
      permissions @3 :List(Bool);
      userId @1 :Text;
    }
    userIsAdmin @4 :Text;
  }
}

struct ApiTokenOwner @0xda970537e2a8a9a9 {
  # Whom a saved token is sealed for (Sandstorm). The field layout matches Sandstorm's so a
  # `save(sealFor)` from a Sandstorm-built client parses; capnet seals to the caller anyway.

  union {
    webkey @0 :Void;
    grain :group {
      grainId @1 :Text;
      saveLabel @2 :Util.LocalizedText;
      introducerIdentity @9 :Text;
      introducerUser @5 :Text;
    }
    clientPowerboxRequest :group {
      sessionId @15 :Text;
      grainId @13 :Text;
      introducerIdentity @14 :Text;
    }
    clientPowerboxOffer :group {
      sessionId @17 :Text;
    }
    internet @3 :AnyPointer;
    frontend @4 :Void;
    user :group {
      accountId @18 :Text;
      identityId @10 :Text;
      title @7 :Text;
      denormalizedGrainMetadata @8 :AnyPointer;
      # Sandstorm's DenormalizedGrainMetadata struct; capnet never reads it.
      userId @6 :Text;
      upstreamTitle @11 :Text;
      renamed @12 :Bool;
      seenAllActivity @16 :Bool;
    }
  }
}
