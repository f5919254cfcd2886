//! Value parsers: the text of one configuration value (a duration, a size, a percentage, a
//! rate, a URL, an LDAP filter, a readable file) into what the program uses, or the message
//! that says what is wrong with it.
//!
//! Each works on one value alone: none knows which key it reads or which file it is in (the
//! walker adds both), and none reads the environment or any file but the one it is asked about.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use super::RateLimit;

/// Parses `"500ms"`, `"30s"`, `"15m"`, `"2h"` or `"7d"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!("invalid duration \"{text}\"; use a whole number followed by ms, s, m, h or d, like \"30s\"")
    };
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(invalid)?;
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let seconds_per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(number)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration \"{text}\" is too long"))
}

pub(super) fn has_scheme(url: &str, scheme: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(s, _)| s.eq_ignore_ascii_case(scheme))
}

/// An `ldap://` or `ldaps://` URL (the scheme in any case), parsed once.
pub(super) fn check_ldap_url(text: &str) -> Result<url::Url, String> {
    let url = parse_url(text, &["ldap", "ldaps"])?;
    if url.query().is_some() || !matches!(url.path(), "" | "/") {
        return Err(format!(
            "invalid url \"{text}\"; give only scheme, host and port (the search bases are ldap.users.base and ldap.groups.base)"
        ));
    }
    Ok(url)
}

/// An `http://` or `https://` URL (the scheme in any case), without trailing slash.
pub(super) fn check_http_url(text: &str) -> Result<String, String> {
    let url = parse_url(text, &["http", "https"])?;
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// An egress proxy: `http://` or `https://` with a host, no credentials in it.
pub(super) fn check_proxy_url(text: &str) -> Result<String, String> {
    let url = parse_url(text, &["http", "https"]).map_err(|e| {
        if e.contains("carries credentials") {
            format!(
                "the proxy url \"{}\" carries credentials (user:password@); proxies that need a login are not supported",
                redact_userinfo(text)
            )
        } else {
            e
        }
    })?;
    Ok(url.as_str().to_owned())
}

/// Parses a URL once with the `url` crate (which lowercases the scheme and host): one of
/// `schemes`, with a host, and without inline credentials.
fn parse_url(text: &str, schemes: &[&str]) -> Result<url::Url, String> {
    let expected = || {
        let names: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
        format!(
            "invalid url \"{}\"; it must start with {}",
            redact_userinfo(text),
            names.join(" or ")
        )
    };
    let url = url::Url::parse(text).map_err(|e| {
        if schemes.iter().any(|s| has_scheme(text, s)) {
            format!("invalid url \"{}\": {e}", redact_userinfo(text))
        } else {
            expected()
        }
    })?;
    if !schemes.contains(&url.scheme()) {
        return Err(expected());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "the url \"{}\" carries credentials (user:password@); put them in auth (or ldap.bind_dn and ldap.bind_password) as a secret instead",
            redact_userinfo(text)
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("invalid url \"{text}\"; it names no host"));
    }
    Ok(url)
}

/// A URL as it may be printed: anything between `://` and an `@` before the host is hidden.
fn redact_userinfo(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => text.to_owned(),
    }
}

/// A size: `"64KiB"`, `"32MiB"`, `"1GiB"`, `"4096B"` or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid =
        || format!("invalid size \"{text}\"; use a number with B, KiB, MiB or GiB, like \"32MiB\"");
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => return Err(invalid()),
    };
    let size = number.checked_mul(factor).ok_or_else(invalid)?;
    if size == 0 {
        return Err(format!(
            "invalid size \"{text}\"; it must be more than zero"
        ));
    }
    Ok(size)
}

pub(super) fn readable_file(path: PathBuf) -> Result<PathBuf, String> {
    match fs::File::open(&path).and_then(|file| file.metadata()) {
        Ok(meta) if meta.is_file() => Ok(path),
        Ok(_) => Err(format!("{} is not a file", path.display())),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Parses `"20%"` into `0.2`.
pub(super) fn parse_percent(text: &str) -> Result<f64, String> {
    let invalid = || {
        format!(
            "invalid percentage \"{text}\"; use a number from 0 to 100 followed by %, like \"20%\""
        )
    };
    let number: f64 = text
        .strip_suffix('%')
        .and_then(|number| number.trim().parse().ok())
        .ok_or_else(invalid)?;
    if (0.0..=100.0).contains(&number) {
        Ok(number / 100.0)
    } else {
        Err(invalid())
    }
}

/// An LDAP filter must be one parenthesized expression; the server does the full parse.
pub(super) fn check_filter(text: &str) -> Result<&str, String> {
    let invalid = |why: &str| format!("invalid LDAP filter \"{text}\": {why}");
    if !text.starts_with('(') {
        return Err(invalid("it must start with \"(\""));
    }
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| invalid("unbalanced parentheses"))?;
                if depth == 0 && i + 1 != text.len() {
                    return Err(invalid("text after the closing parenthesis"));
                }
            }
            _ => {}
        }
    }
    if depth == 0 {
        Ok(text)
    } else {
        Err(invalid("unbalanced parentheses"))
    }
}

/// Parses `"10/s"`, `"180/m"` (or `/min`) and `"3600/h"`.
pub(super) fn parse_rate_limit(text: &str) -> Result<RateLimit, String> {
    let invalid = || {
        format!(
            "invalid rate limit \"{text}\"; use requests per s, m or h, like \"10/s\" or \"180/m\""
        )
    };
    let (count, unit) = text.split_once('/').ok_or_else(invalid)?;
    let count: f64 = count.trim().parse().map_err(|_| invalid())?;
    let seconds = match unit.trim() {
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(invalid()),
    };
    if count.is_finite() && count > 0.0 {
        Ok(RateLimit {
            per_second: count / seconds,
        })
    } else {
        Err(invalid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10B"), Ok(10));
        assert!(parse_size("0KiB").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in [
            "",
            "30",
            "s",
            "-1s",
            "1.5h",
            "30 s",
            "1w",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn filters() {
        for good in ["(uid=*)", "(&(objectClass=user)(!(cn=a\\29b)))"] {
            assert!(check_filter(good).is_ok(), "{good}");
        }
        for bad in ["uid=*", "(uid=*", "(uid=*))", "(a)(b)", ""] {
            assert!(check_filter(bad).is_err(), "{bad:?} accepted");
        }
    }
}
