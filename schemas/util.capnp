@0xecd50d792c3d9992;
# Sandstorm-compatible utility types, written for capnet.
#
# The type IDs, names, method ordinals and parameter types below match Sandstorm's
# `util.capnp`, so a peer compiled from Sandstorm's schema talks to capnet unchanged.
# Only the types capnet uses are declared here.

struct KeyValue @0x94a081e4abb13424 {
  key @0 :Text;
  value @1 :Text;
}

struct LocalizedText @0x8b5db772377be249 {
  # Text with optional translations, used for labels the administrator sees.

  defaultText @0 :Text;
  localizations @1 :List(Localization);

  struct Localization @0xa4f5ae06dd1b7791 {
    locale @0 :Text;  # IETF BCP 47 tag, such as "en-US".
    text @1 :Text;
  }
}

interface Handle @0x98f424ac606042e0 {
  # A token standing for a resource or an ongoing operation (a TCP listener, for example).
  #
  # Ownership: whoever holds the last reference owns the resource. Dropping every reference
  # cancels what the handle stands for; in capnet that happens at once (a listener stops
  # accepting as soon as its handle is released).

  ping @0 ();
  # Succeeds while the resource is alive. A DISCONNECTED exception means it is gone, for
  # example because the grant behind it was revoked or its driver restarted.
}

interface ByteStream @0xcd57387729cfe35f {
  # The receiving end of an ordered stream of bytes (push-style, like an output stream).
  #
  # Flow control: `write` is a streaming method. A caller may keep several writes in flight;
  # Cap'n Proto's per-connection window throttles it, and the callee delays returning from
  # `write` while its own destination is full, so backpressure travels end to end.
  #
  # Ending: call `done` after the last write (a half-close on TCP). Releasing the stream
  # without `done` means the data is incomplete: the callee tears the connection down.

  write @0 (data :Data) -> stream;
  # Appends `data`. Errors are sticky: after a failed write every later call fails too.

  done @1 ();
  # No more data will follow. Returns once the bytes have been handed to their destination;
  # fails if the destination failed or the total does not match `expectSize`.

  expectSize @2 (size :UInt64);
  # A hint: `size` more bytes will be written before `done`. Callees may ignore it.
}
