//! Reading what the relay policy needs from a message: the addresses in its `From:`
//! header. The parser is small and strict about what it accepts (exactly one `From:`
//! header, every mailbox in it a plausible address) and never panics on hostile input.

/// Why the `From:` header is unacceptable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FromError {
    /// No `From:` header.
    #[error("the message has no From: header")]
    Missing,
    /// More than one `From:` header.
    #[error("the message has {0} From: headers")]
    Several(usize),
    /// The header lists no mailbox, or one that is not an address.
    #[error("the From: header has no valid address")]
    Invalid,
}

/// The header section: everything before the first empty line, unfolded into fields.
fn header_fields(data: &[u8]) -> Vec<String> {
    let mut fields: Vec<String> = Vec::new();
    for raw in data.split(|b| *b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(last) = fields.last_mut() {
                last.push(' ');
                last.push_str(text.trim());
            }
            continue;
        }
        fields.push(text.into_owned());
    }
    fields
}

/// Removes RFC 5322 comments (parenthesised, nestable) outside quoted strings.
fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0u32;
    let mut quoted = false;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            if depth == 0 {
                out.push(c);
            }
            escaped = false;
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth = depth.saturating_add(1),
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// Splits a mailbox list at commas outside quotes and angle brackets; drops group names.
fn split_mailboxes(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut angle = false;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                cur.push(c);
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            '<' if !quoted => {
                angle = true;
                cur.push(c);
            }
            '>' if !quoted => {
                angle = false;
                cur.push(c);
            }
            ':' if !quoted && !angle => cur.clear(), // "group: a, b;"
            ',' | ';' if !quoted && !angle => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

/// The address of one mailbox: inside angle brackets, or the whole (bare) text.
fn mailbox_address(m: &str) -> Option<String> {
    let addr = match (m.rfind('<'), m.rfind('>')) {
        (Some(a), Some(b)) if a < b => &m[a + 1..b],
        (None, None) => m,
        _ => return None,
    };
    let addr = addr.trim();
    if crate::server::is_mailbox(addr) && !addr.contains(char::is_whitespace) && !addr.contains('"')
    {
        Some(addr.to_string())
    } else {
        None
    }
}

/// The addresses in the message's one `From:` header.
pub fn from_addresses(data: &[u8]) -> Result<Vec<String>, FromError> {
    let froms: Vec<String> = header_fields(data)
        .into_iter()
        .filter_map(|f| {
            let (name, value) = f.split_once(':')?;
            name.trim_end()
                .eq_ignore_ascii_case("from")
                .then(|| value.to_string())
        })
        .collect();
    let value = match froms.as_slice() {
        [] => return Err(FromError::Missing),
        [one] => one,
        more => return Err(FromError::Several(more.len())),
    };
    let mailboxes = split_mailboxes(&strip_comments(value));
    if mailboxes.is_empty() {
        return Err(FromError::Invalid);
    }
    mailboxes
        .iter()
        .map(|m| mailbox_address(m).ok_or(FromError::Invalid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The usual forms of a From: header yield their addresses; folding, comments and
    /// quoted names with commas are handled.
    #[test]
    fn from_forms() {
        let ok = |h: &str| from_addresses(format!("{h}\r\nSubject: x\r\n\r\nbody\r\n").as_bytes());
        assert_eq!(ok("From: a@b.test"), Ok(vec!["a@b.test".into()]));
        assert_eq!(ok("FROM: App <app@b.test>"), Ok(vec!["app@b.test".into()]));
        assert_eq!(
            ok("From: \"Doe, Jane\" <jane@b.test>, x@y.test"),
            Ok(vec!["jane@b.test".into(), "x@y.test".into()])
        );
        assert_eq!(
            ok("From: (comment <evil@x.test>) a@b.test"),
            Ok(vec!["a@b.test".into()])
        );
        assert_eq!(
            ok("From:\r\n  Folded <f@b.test>"),
            Ok(vec!["f@b.test".into()])
        );
        assert_eq!(
            ok("From: team: a@b.test, c@d.test;"),
            Ok(vec!["a@b.test".into(), "c@d.test".into()])
        );
    }

    /// Missing, duplicated or unusable From: headers are refused; a From: line in the body
    /// does not count.
    #[test]
    fn from_refusals() {
        assert_eq!(
            from_addresses(b"Subject: x\r\n\r\nFrom: a@b\r\n"),
            Err(FromError::Missing)
        );
        assert_eq!(
            from_addresses(b"From: a@b.test\r\nFrom: c@d.test\r\n\r\n"),
            Err(FromError::Several(2))
        );
        assert_eq!(
            from_addresses(b"From: nobody\r\n\r\n"),
            Err(FromError::Invalid)
        );
        assert_eq!(
            from_addresses(b"From: <a@b.test\r\n\r\n"),
            Err(FromError::Invalid)
        );
        assert_eq!(from_addresses(b"From: \r\n\r\n"), Err(FromError::Invalid));
        assert_eq!(from_addresses(b""), Err(FromError::Missing));
        assert_eq!(
            from_addresses(&[0xff, b':', b'\n']),
            Err(FromError::Missing)
        );
    }
}
