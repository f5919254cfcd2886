//! Distinguished names (RFC 4514): parsing and a normalized form for comparison.
//!
//! Directories hand back the same DN spelled differently (`\"` vs `\22`, `CN=` vs `cn=`,
//! spaces after commas), so member lists are only ever compared in normalized form.

/// Parses `dn` into RDNs of (attribute type, unescaped value) pairs, or `None` if malformed.
pub fn parse(dn: &str) -> Option<Vec<Vec<(String, String)>>> {
    let mut rdns = Vec::new();
    let mut rdn: Vec<(String, String)> = Vec::new();
    let mut chars = dn.trim().chars().peekable();
    if chars.peek().is_none() {
        return Some(rdns);
    }
    loop {
        // attribute type
        let mut ty = String::new();
        let mut has_value = false;
        for c in chars.by_ref() {
            if c == '=' {
                has_value = true;
                break;
            }
            ty.push(c);
        }
        let ty = ty.trim().to_ascii_lowercase();
        if ty.is_empty() || !has_value {
            return None;
        }
        // value, up to an unescaped ',' or '+' or the end
        let mut value: Vec<u8> = Vec::new();
        let mut pending_space = 0usize;
        while let Some(&c) = chars.peek() {
            if value.is_empty() && pending_space == 0 && c == ' ' {
                chars.next();
                continue;
            }
            match c {
                ',' | ';' | '+' => break,
                '\\' => {
                    chars.next();
                    value.resize(value.len() + pending_space, b' ');
                    pending_space = 0;
                    let first = chars.next()?;
                    if first.is_ascii_hexdigit() {
                        let second = *chars.peek()?;
                        if second.is_ascii_hexdigit() {
                            chars.next();
                            let byte = u8::from_str_radix(&format!("{first}{second}"), 16).ok()?;
                            value.push(byte);
                            continue;
                        }
                    }
                    let mut buf = [0u8; 4];
                    value.extend_from_slice(first.encode_utf8(&mut buf).as_bytes());
                }
                ' ' => {
                    chars.next();
                    pending_space += 1;
                }
                _ => {
                    chars.next();
                    value.resize(value.len() + pending_space, b' ');
                    pending_space = 0;
                    let mut buf = [0u8; 4];
                    value.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        let value = String::from_utf8(value).ok()?;
        rdn.push((ty, value));
        match chars.next() {
            Some('+') => continue,
            Some(',') | Some(';') => {
                rdns.push(std::mem::take(&mut rdn));
            }
            None => {
                rdns.push(rdn);
                return Some(rdns);
            }
            Some(_) => return None,
        }
    }
}

/// The normalized form of `dn`: lowercase types and values, canonical escaping, multi-valued
/// RDNs sorted. Two DNs naming the same entry have the same normalized form.
pub fn normalize(dn: &str) -> Option<String> {
    if let Some(fast) = normalize_plain(dn) {
        return Some(fast);
    }
    let rdns = parse(dn)?;
    let parts: Vec<String> = rdns
        .into_iter()
        .map(|mut rdn| {
            for (_, v) in rdn.iter_mut() {
                *v = v.to_lowercase();
            }
            rdn.sort();
            rdn.iter()
                .map(|(t, v)| format!("{t}={}", escape_value(v)))
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    Some(parts.join(","))
}

/// The common case without escapes, quotes, multi-valued RDNs or characters that would need
/// escaping: lowercase and trim each `type=value`. Gives the same result as the full parser.
fn normalize_plain(dn: &str) -> Option<String> {
    if !dn.is_ascii()
        || dn
            .bytes()
            .any(|b| matches!(b, b'\\' | b'+' | b'"' | b';' | b'<' | b'>' | b'#'))
    {
        return None;
    }
    let mut out = String::with_capacity(dn.len());
    for (i, rdn) in dn.trim().split(',').enumerate() {
        let (ty, value) = rdn.split_once('=')?;
        let (ty, value) = (ty.trim(), value.trim());
        if ty.is_empty() || value.contains('=') {
            return None;
        }
        if i > 0 {
            out.push(',');
        }
        out.extend(ty.chars().map(|c| c.to_ascii_lowercase()));
        out.push('=');
        out.extend(value.chars().map(|c| c.to_ascii_lowercase()));
    }
    Some(out)
}

/// [`normalize`] for a DN someone wrote (a configuration value): it must name at least one
/// RDN, each with an attribute type (letters, digits, `-`, `.`) and a non-empty value. The
/// error says what a DN looks like.
pub fn normalize_strict(dn: &str) -> Result<String, String> {
    let invalid = || {
        format!("invalid DN \"{dn}\"; expected attribute=value pairs like \"cn=staff,ou=groups,dc=example,dc=org\"")
    };
    let rdns = parse(dn).ok_or_else(invalid)?;
    let well_formed = !rdns.is_empty()
        && rdns.iter().flatten().all(|(ty, value)| {
            !value.is_empty()
                && ty
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        });
    if !well_formed {
        return Err(invalid());
    }
    normalize(dn).ok_or_else(invalid)
}

/// Normalizes, falling back to a lowercased copy for a DN that does not parse (so a
/// malformed member value never matches a real entry by accident, and never panics).
pub fn normalize_lossy(dn: &str) -> String {
    normalize(dn).unwrap_or_else(|| format!("!{}", dn.to_lowercase()))
}

/// The value of the first RDN (`cn=Eng Team,ou=groups` → `Eng Team`).
pub fn first_rdn_value(dn: &str) -> Option<String> {
    parse(dn)?
        .into_iter()
        .next()?
        .into_iter()
        .next()
        .map(|(_, v)| v)
}

fn escape_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == ' ' || c == '#'))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_char_escapes_normalize_alike() {
        let a = normalize(r#"CN=Smith\, \"Bob\" , OU=People,dc=Example,dc=org"#).unwrap();
        let b = normalize(r"cn=smith\2C \22bob\22,ou=people, dc=example, dc=org").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, r#"cn=smith\, \"bob\",ou=people,dc=example,dc=org"#);
    }

    #[test]
    fn utf8_hex_escapes_decode() {
        let a = normalize(r"cn=J\C3\BCrgen M\C3\BCller,ou=people,dc=example,dc=org").unwrap();
        assert_eq!(a, "cn=jürgen müller,ou=people,dc=example,dc=org");
        assert_eq!(first_rdn_value("cn=Jürgen,dc=x").as_deref(), Some("Jürgen"));
    }

    #[test]
    fn multivalued_rdn_is_sorted() {
        assert_eq!(normalize("uid=b+cn=a,dc=x"), normalize("cn=A+uid=B,dc=x"));
    }

    #[test]
    fn the_plain_fast_path_agrees_with_the_parser() {
        for dn in [
            "uid=Alice,ou=People,dc=Example,dc=org",
            " CN = Eng Team , OU=groups,DC=x",
            "cn=a b  c,dc=x",
            "uid=x",
        ] {
            let slow = parse(dn).map(|rdns| {
                rdns.into_iter()
                    .map(|rdn| {
                        rdn.iter()
                            .map(|(t, v)| format!("{t}={}", escape_value(&v.to_lowercase())))
                            .collect::<Vec<_>>()
                            .join("+")
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            });
            assert_eq!(normalize_plain(dn), slow, "{dn}");
        }
        assert_eq!(normalize_plain("cn=a\\,b,dc=x"), None);
        assert_eq!(normalize_plain("cn=Jürgen,dc=x"), None);
    }

    #[test]
    fn dns_are_normalized() {
        let normalize_dn = normalize_strict;
        assert_eq!(
            normalize_dn("CN=Slack Users, OU = Groups ,DC=Example,DC=org"),
            Ok("cn=slack users,ou=groups,dc=example,dc=org".into())
        );
        assert_eq!(
            normalize_dn("cn=Smith\\, John + uid=JS,dc=x"),
            Ok("cn=smith\\, john+uid=js,dc=x".into())
        );
        assert_eq!(
            normalize_dn("cn=trailing\\ ,dc=x"),
            Ok("cn=trailing\\ ,dc=x".into())
        );
        for bad in ["", "slack-users", "cn=,dc=x", "=x"] {
            assert!(normalize_dn(bad).is_err(), "{bad:?} accepted");
        }
        // Beyond the configuration's old reader: one spelling per entry.
        assert_eq!(
            normalize_dn("uid=JS+cn=Smith,dc=x"),
            normalize_dn("cn=smith+uid=js,dc=x")
        );
        assert!(normalize_dn("cn=a,,dc=x").is_err());
    }

    #[test]
    fn malformed_dn_is_rejected() {
        assert!(parse("no-equals-sign").is_none());
        assert!(parse(r"cn=trailing\").is_none());
        assert!(normalize_lossy("garbage").starts_with('!'));
    }
}
