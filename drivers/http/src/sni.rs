//! Reading the server name (SNI) from a TLS ClientHello without terminating TLS.
//!
//! The ClientHello is the first handshake message a TLS client sends, in clear text, in
//! one or more handshake records. [`client_hello_sni`] is given the bytes received so far
//! and says whether more are needed, the name, or why the bytes are unacceptable. Every
//! length is checked against what is there; nothing here can panic or read out of bounds.

/// The largest ClientHello accepted (post-quantum key shares make them large; 64 KiB is
/// far above any real one).
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Sni {
    /// More bytes are needed.
    Incomplete,
    /// The ClientHello names this server.
    Name(String),
    /// A complete ClientHello without a server name.
    Missing,
    /// Not a TLS ClientHello (or a malformed one), with the reason.
    Invalid(&'static str),
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(b[0]) << 8 | usize::from(b[1]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// Joins the payloads of the handshake records at the start of `data`; `None` if the
/// records so far do not hold `need` bytes yet.
fn handshake_bytes(data: &[u8]) -> Result<Vec<u8>, Sni> {
    let mut out = Vec::new();
    let mut c = Cursor { b: data };
    loop {
        let Some(header) = c.take(5) else {
            return Ok(out);
        };
        if header[0] != 22 {
            return Err(Sni::Invalid("the first record is not a TLS handshake"));
        }
        if header[1] != 3 {
            return Err(Sni::Invalid("not a TLS record version"));
        }
        let len = usize::from(header[3]) << 8 | usize::from(header[4]);
        if len == 0 || len > 16384 + 2048 {
            return Err(Sni::Invalid("bad TLS record length"));
        }
        match c.take(len) {
            Some(payload) => out.extend_from_slice(payload),
            None => {
                out.extend_from_slice(c.b);
                return Ok(out);
            }
        }
    }
}

/// Inspects the start of a TLS connection for the ClientHello's server name.
pub fn client_hello_sni(data: &[u8]) -> Sni {
    let hs = match handshake_bytes(data) {
        Ok(hs) => hs,
        Err(e) => return e,
    };
    let mut c = Cursor { b: &hs };
    let (Some(kind), Some(len)) = (c.u8(), c.u24()) else {
        return Sni::Incomplete;
    };
    if kind != 1 {
        return Sni::Invalid("the first handshake message is not a ClientHello");
    }
    if len > MAX_CLIENT_HELLO {
        return Sni::Invalid("the ClientHello is too large");
    }
    let Some(body) = c.take(len) else {
        return if data.len() > MAX_CLIENT_HELLO + 1024 {
            Sni::Invalid("the ClientHello is too large")
        } else {
            Sni::Incomplete
        };
    };
    parse_client_hello(body).unwrap_or(Sni::Invalid("malformed ClientHello"))
}

fn parse_client_hello(body: &[u8]) -> Option<Sni> {
    let mut c = Cursor { b: body };
    c.take(2)?; // legacy_version
    c.take(32)?; // random
    c.vec8()?; // session id
    c.vec16()?; // cipher suites
    c.vec8()?; // compression methods
    if c.b.is_empty() {
        return Some(Sni::Missing);
    }
    let mut ext = Cursor { b: c.vec16()? };
    while !ext.b.is_empty() {
        let kind = ext.u16()?;
        let data = ext.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut list = Cursor { b: data };
        let mut names = Cursor { b: list.vec16()? };
        while !names.b.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec16()?;
            if name_type == 0 {
                return Some(match std::str::from_utf8(name) {
                    Ok(n) if !n.is_empty() => Sni::Name(n.to_string()),
                    _ => Sni::Invalid("the server name is not text"),
                });
            }
        }
        return Some(Sni::Missing);
    }
    Some(Sni::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(extensions);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn sni_ext(name: &str) -> Vec<u8> {
        let mut entry = vec![0];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(&list);
        ext
    }

    /// The name is found; every prefix of the hello is Incomplete, never an error or panic.
    #[test]
    fn finds_the_name_and_waits_for_more() {
        let mut exts = vec![0, 10, 0, 2, 0, 29]; // supported_groups first
        exts.extend_from_slice(&sni_ext("allowed.test"));
        let h = hello(&exts);
        assert_eq!(client_hello_sni(&h), Sni::Name("allowed.test".into()));
        for i in 0..h.len() {
            assert_eq!(client_hello_sni(&h[..i]), Sni::Incomplete, "prefix {i}");
        }
    }

    /// A hello without SNI is Missing; other protocols and garbage are Invalid; random
    /// bytes never panic.
    #[test]
    fn missing_invalid_and_garbage() {
        assert_eq!(client_hello_sni(&hello(&[])), Sni::Missing);
        assert!(matches!(
            client_hello_sni(b"GET / HTTP/1.1\r\n"),
            Sni::Invalid(_)
        ));
        let mut bad = hello(&sni_ext("x.test"));
        bad[5] = 2; // ServerHello
        assert!(matches!(client_hello_sni(&bad), Sni::Invalid(_)));
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let mut buf = vec![22u8, 3, 1, 0, 60, 1, 0, 0, 56];
            for _ in 0..60 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                buf.push(x as u8);
            }
            let _ = client_hello_sni(&buf);
        }
    }
}
