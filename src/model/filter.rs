//! LDAP search filters (RFC 4515) evaluated here, over an entry the directory read already
//! returned: what `groups_filter` chooses groups with, for every target from one read (and
//! from the mirror, with a change feed), without another search per target.
//!
//! The subset is what group selection needs: `&`, `|`, `!`, equality, presence, substrings
//! (`*`), `>=` and `<=`, and `~=` read as equality. Values compare case-insensitively (the
//! matching rule of names, descriptions and most group attributes); DN-valued attributes
//! (`member`, `uniqueMember`, `memberOf`, `owner`, `manager`) compare as normalized DNs. An
//! extensible match is refused when the filter is read, never guessed.

use super::dn;
use super::Attributes;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Equal(String, String),
    Present(String),
    /// initial, any…, final (each lowercased; empty initial/final: none).
    Substring(String, String, Vec<String>, String),
    GreaterOrEqual(String, String),
    LessOrEqual(String, String),
}

const DN_ATTRIBUTES: &[&str] = &["member", "uniquemember", "memberof", "owner", "manager"];

impl Filter {
    /// Parses `text`; the error says what is wrong and where.
    pub fn parse(text: &str) -> Result<Filter, String> {
        let mut p = Parser {
            text: text.trim(),
            pos: 0,
        };
        let filter = p.filter()?;
        if p.pos != p.text.len() {
            return Err(format!(
                "unexpected text after the filter at position {}",
                p.pos + 1
            ));
        }
        Ok(filter)
    }

    /// The attributes the filter names (lowercased), so the read asks for them.
    pub fn attributes(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out.sort();
        out.dedup();
        out
    }

    fn collect(&self, out: &mut Vec<String>) {
        match self {
            Filter::And(fs) | Filter::Or(fs) => fs.iter().for_each(|f| f.collect(out)),
            Filter::Not(f) => f.collect(out),
            Filter::Equal(a, _)
            | Filter::Present(a)
            | Filter::Substring(a, _, _, _)
            | Filter::GreaterOrEqual(a, _)
            | Filter::LessOrEqual(a, _) => out.push(a.clone()),
        }
    }

    /// Whether the entry (`dn`, attributes keyed lowercase) matches. `objectClass`-free
    /// entries and absent attributes match nothing but `!`.
    pub fn matches(&self, entry_dn: &str, attrs: &Attributes) -> bool {
        let values = |attr: &str| -> Vec<String> {
            let vals = attrs.get(attr).map(Vec::as_slice).unwrap_or_default();
            if DN_ATTRIBUTES.contains(&attr) {
                vals.iter().map(|v| dn::normalize_lossy(v)).collect()
            } else if attr == "entrydn" || attr == "distinguishedname" {
                vec![dn::normalize_lossy(entry_dn)]
            } else {
                vals.iter().map(|v| v.to_lowercase()).collect()
            }
        };
        let wanted = |attr: &str, value: &str| {
            if DN_ATTRIBUTES.contains(&attr) || attr == "entrydn" || attr == "distinguishedname" {
                dn::normalize_lossy(value)
            } else {
                value.to_lowercase()
            }
        };
        match self {
            Filter::And(fs) => fs.iter().all(|f| f.matches(entry_dn, attrs)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(entry_dn, attrs)),
            Filter::Not(f) => !f.matches(entry_dn, attrs),
            Filter::Present(a) => attrs.contains_key(a) || a == "objectclass" && !attrs.is_empty(),
            Filter::Equal(a, v) => {
                let v = wanted(a, v);
                values(a).contains(&v)
            }
            Filter::Substring(a, initial, any, last) => values(a)
                .iter()
                .any(|x| substring_match(x, initial, any, last)),
            Filter::GreaterOrEqual(a, v) => values(a)
                .iter()
                .any(|x| compare(x, &wanted(a, v)) != std::cmp::Ordering::Less),
            Filter::LessOrEqual(a, v) => values(a)
                .iter()
                .any(|x| compare(x, &wanted(a, v)) != std::cmp::Ordering::Greater),
        }
    }
}

/// Numbers as numbers, anything else as text.
fn compare(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<i128>(), b.parse::<i128>()) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        _ => a.cmp(b),
    }
}

fn substring_match(value: &str, initial: &str, any: &[String], last: &str) -> bool {
    let Some(mut rest) = value.strip_prefix(initial) else {
        return false;
    };
    for part in any {
        match rest.find(part.as_str()) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        match self.peek() {
            Some(found) if found == c => {
                self.pos += c.len_utf8();
                Ok(())
            }
            Some(found) => Err(format!(
                "expected '{c}' at position {}, found '{found}'",
                self.pos + 1
            )),
            None => Err(format!("expected '{c}' at the end")),
        }
    }

    fn filter(&mut self) -> Result<Filter, String> {
        self.expect('(')?;
        let filter = match self.peek() {
            Some('&') => {
                self.pos += 1;
                Filter::And(self.list()?)
            }
            Some('|') => {
                self.pos += 1;
                Filter::Or(self.list()?)
            }
            Some('!') => {
                self.pos += 1;
                Filter::Not(Box::new(self.filter()?))
            }
            _ => self.item()?,
        };
        self.expect(')')?;
        Ok(filter)
    }

    fn list(&mut self) -> Result<Vec<Filter>, String> {
        let mut out = Vec::new();
        while self.peek() == Some('(') {
            out.push(self.filter()?);
        }
        if out.is_empty() {
            return Err(format!(
                "'&' and '|' need at least one filter (position {})",
                self.pos + 1
            ));
        }
        Ok(out)
    }

    fn item(&mut self) -> Result<Filter, String> {
        let start = self.pos;
        let rest = &self.text[start..];
        let end = rest
            .find(['=', '~', '>', '<', ':', '(', ')'])
            .ok_or_else(|| format!("an unfinished filter item at position {}", start + 1))?;
        let attr = rest[..end].trim();
        if attr.is_empty()
            || !attr
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == ';')
        {
            return Err(format!(
                "\"{attr}\" at position {} is not an attribute name",
                start + 1
            ));
        }
        let attr = attr.to_ascii_lowercase();
        self.pos = start + end;
        let op: &str = match &rest[end..] {
            r if r.starts_with("~=") => "~=",
            r if r.starts_with(">=") => ">=",
            r if r.starts_with("<=") => "<=",
            r if r.starts_with('=') => "=",
            r if r.starts_with(':') => {
                return Err(format!(
                    "an extensible match (\"{attr}:…\") is not supported in groups_filter"
                ))
            }
            _ => {
                return Err(format!(
                    "expected '=', '~=', '>=' or '<=' after {attr} at position {}",
                    self.pos + 1
                ))
            }
        };
        self.pos += op.len();
        let value_start = self.pos;
        let value_end = self.text[value_start..]
            .find([')', '('])
            .map(|i| value_start + i)
            .unwrap_or(self.text.len());
        if self.text[value_start..value_end].is_empty() && op == "=" {
            return Err(format!("{attr}= needs a value (or * for presence)"));
        }
        let raw = &self.text[value_start..value_end];
        self.pos = value_end;
        if op != "=" {
            let value = unescape(raw)?;
            return Ok(match op {
                ">=" => Filter::GreaterOrEqual(attr, value),
                "<=" => Filter::LessOrEqual(attr, value),
                _ => Filter::Equal(attr, value),
            });
        }
        if raw == "*" {
            return Ok(Filter::Present(attr));
        }
        if !raw.contains('*') {
            return Ok(Filter::Equal(attr, unescape(raw)?));
        }
        let parts: Vec<String> = raw
            .split('*')
            .map(|p| unescape(p).map(|p| p.to_lowercase()))
            .collect::<Result<_, _>>()?;
        let (initial, rest) = parts.split_first().expect("split gives one part at least");
        let (last, any) = rest.split_last().expect("a '*' gives two parts");
        Ok(Filter::Substring(
            attr,
            initial.clone(),
            any.iter().filter(|p| !p.is_empty()).cloned().collect(),
            last.clone(),
        ))
    }
}

/// RFC 4515 escapes: `\2a` is `*`, `\28` `(`, `\29` `)`, `\5c` `\`.
fn unescape(raw: &str) -> Result<String, String> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut iter = raw.bytes();
    while let Some(b) = iter.next() {
        if b == b'\\' {
            let hex: Vec<u8> = iter.by_ref().take(2).collect();
            let pair = std::str::from_utf8(&hex).ok().filter(|h| h.len() == 2);
            match pair.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(byte) => bytes.push(byte),
                None => {
                    return Err(format!(
                        "\"{raw}\": a '\\' must be followed by two hex digits"
                    ))
                }
            }
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).map_err(|_| format!("\"{raw}\": escapes that are not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pairs: &[(&str, &[&str])]) -> Attributes {
        pairs
            .iter()
            .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
            .collect()
    }

    #[test]
    fn filters_match_like_a_server() {
        let g = entry(&[
            ("cn", &["App-Sales"]),
            ("description", &["Sales (EMEA)"]),
            ("member", &["UID=a, ou=People,dc=x"]),
            ("gidnumber", &["1200"]),
        ]);
        for (filter, expected) in [
            ("(cn=app-*)", true),
            ("(cn=*sales)", true),
            ("(cn=a*-*s)", true),
            ("(cn=app-)", false),
            ("(cn=APP-SALES)", true),
            ("(description=sales \\28emea\\29)", true),
            ("(&(cn=app-*)(!(cn=*-admins)))", true),
            ("(|(cn=eng)(cn=ops))", false),
            ("(member=uid=a,ou=people,dc=x)", true),
            ("(description=*)", true),
            ("(owner=*)", false),
            ("(!(owner=*))", true),
            ("(gidNumber>=1000)", true),
            ("(entryDN=CN=App-Sales, ou=groups,dc=x)", true),
            ("(gidNumber<=999)", false),
            ("(cn~=app-sales)", true),
        ] {
            let f = Filter::parse(filter).unwrap();
            assert_eq!(
                f.matches("cn=App-Sales,ou=groups,dc=x", &g),
                expected,
                "{filter}"
            );
        }
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        for (bad, why) in [
            ("cn=app-*", "expected '('"),
            ("(cn=app-*", "expected ')'"),
            ("(&)", "at least one filter"),
            ("(cn:dn:=x)", "extensible match"),
            ("(=x)", "not an attribute name"),
            ("(cn=x\\zz)", "two hex digits"),
            ("(cn=x))", "unexpected text"),
            ("(cn=)", "needs a value"),
        ] {
            let err = Filter::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn filters_name_their_attributes() {
        let f = Filter::parse("(&(cn=app-*)(|(businessCategory=x)(!(CN=y))))").unwrap();
        assert_eq!(f.attributes(), vec!["businesscategory", "cn"]);
    }
}
