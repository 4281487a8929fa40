@0xd58a4b7c2e1f9a63;
# Cap'n Proto's standard `Persistent` interface, restated for capnet with the upstream type
# IDs (capnp/persistent.capnp) so that `save()` calls from any Cap'n Proto peer reach us.

interface Persistent @0xc8cb212fcd9f5691 (SturdyRef, Owner) {
  # An object that can be saved and restored later by token.

  save @0 SaveParams -> SaveResults;
  # Returns a token (the SturdyRef) from which the caller's owner can later restore an
  # equivalent capability. In capnet the token is at least 256 random bits; only its hash
  # is stored, and only the grain that saved it can restore it.

  struct SaveParams @0xf76fba59183073a5 {
    sealFor @0 :Owner;
    # Whom the token is sealed for. capnet always seals tokens to the calling grain and
    # ignores this field.
  }

  struct SaveResults @0xb76848c18c40efbf {
    sturdyRef @0 :SturdyRef;
  }
}
