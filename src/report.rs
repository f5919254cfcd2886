//! Renders the outcome of a pass: the dry-run report (text, JSON as in SPEC.md, Markdown) and
//! the result lines of a sync. Pure.

use std::borrow::Cow;
use std::fmt::Write;

use serde_json::{json, Map, Value};

use crate::model::DirectoryId;
use crate::outcome::{Outcome, TargetOutcome};
use crate::plan::{Change, Problem, Reason};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Markdown,
}

pub fn render(outcome: &Outcome, format: Format) -> String {
    match format {
        Format::Json => {
            serde_json::to_string_pretty(&to_json(outcome)).expect("reports serialize") + "\n"
        }
        Format::Text => pieces(&Text, outcome),
        Format::Markdown => pieces(&Markdown, outcome),
    }
}

/// The per-target counts of SPEC.md's report, in its order (plus adoptions).
struct Summary {
    counts: Vec<(&'static str, usize)>,
}

impl Summary {
    const KEYS: [&'static str; 12] = [
        "users_created",
        "users_adopted",
        "users_updated",
        "users_deactivated",
        "users_deleted",
        "groups_created",
        "groups_adopted",
        "groups_updated",
        "groups_deleted",
        "members_added",
        "members_removed",
        "held",
    ];

    fn of(t: &TargetOutcome) -> Summary {
        let mut counts: Vec<(&'static str, usize)> = Self::KEYS.iter().map(|k| (*k, 0)).collect();
        let mut rebound = 0;
        let mut bump = |key: &str, n: usize| {
            if let Some(slot) = counts.iter_mut().find(|(k, _)| *k == key) {
                slot.1 += n;
            }
        };
        for c in &t.plan.changes {
            match c {
                Change::CreateUser { .. } => bump("users_created", 1),
                Change::AdoptUser { .. } => bump("users_adopted", 1),
                Change::UpdateUser { .. } => bump("users_updated", 1),
                Change::DeactivateUser { .. } => bump("users_deactivated", 1),
                Change::DeleteUser { .. } => bump("users_deleted", 1),
                Change::CreateGroup { .. } => bump("groups_created", 1),
                Change::AdoptGroup { .. } => bump("groups_adopted", 1),
                Change::UpdateGroup { .. } => bump("groups_updated", 1),
                Change::DeleteGroup { .. } => bump("groups_deleted", 1),
                Change::AddMembers { members, .. } => bump("members_added", members.len()),
                Change::RemoveMembers { members, .. } => bump("members_removed", members.len()),
                Change::Rebind { .. } => rebound += 1,
                // Only an approved orphan is in `changes`: it goes as the policy says.
                Change::Orphan { delete: true, .. } => bump("users_deleted", 1),
                Change::Orphan { .. } => bump("users_deactivated", 1),
            }
        }
        bump("held", t.plan.held.len());
        // Shown only when there are some: a rebind is rare, and the other keys are SPEC's.
        if rebound > 0 {
            counts.insert(3, ("users_rebound", rebound));
        }
        Summary { counts }
    }

    fn to_json(&self) -> Value {
        Value::Object(
            self.counts
                .iter()
                .map(|(k, n)| (k.to_string(), json!(n)))
                .collect(),
        )
    }
}

fn member_names(t: &TargetOutcome, members: &[DirectoryId]) -> Vec<String> {
    members
        .iter()
        .map(|m| t.names.get(m).cloned().unwrap_or_else(|| m.0.clone()))
        .collect()
}

fn change_json(t: &TargetOutcome, c: &Change) -> Value {
    let mut obj = Map::new();
    obj.insert("action".into(), json!(c.action()));
    obj.insert("resource".into(), json!(c.resource()));
    obj.insert("external_id".into(), json!(c.id().0));
    obj.insert("name".into(), json!(c.name()));
    match c {
        Change::UpdateUser { changes, .. }
        | Change::DeactivateUser { changes, .. }
        | Change::AdoptUser { changes, .. }
        | Change::Rebind { changes, .. } => {
            let attrs: Map<String, Value> = changes
                .iter()
                .map(|a| (a.path.clone(), json!({"from": a.from, "to": a.to})))
                .collect();
            obj.insert("attributes".into(), Value::Object(attrs));
        }
        Change::AdoptGroup { changes, .. } => {
            let attrs: Map<String, Value> = changes
                .iter()
                .map(|a| (a.path.clone(), json!({"from": a.from, "to": a.to})))
                .collect();
            obj.insert("attributes".into(), Value::Object(attrs));
        }
        Change::UpdateGroup {
            display_name,
            from_name,
            ..
        } => {
            obj.insert(
                "attributes".into(),
                json!({"displayName": {"from": from_name, "to": display_name}}),
            );
        }
        Change::AddMembers { members, .. } | Change::RemoveMembers { members, .. } => {
            obj.insert("members".into(), json!(member_names(t, members)));
        }
        _ => {}
    }
    match c {
        Change::DeactivateUser { reason, .. } | Change::DeleteUser { reason, .. } => {
            obj.insert("reason".into(), json!(reason));
        }
        Change::AdoptUser { matched_by, .. } | Change::AdoptGroup { matched_by, .. } => {
            obj.insert("matched_by".into(), json!(matched_by));
        }
        Change::Rebind {
            from,
            from_name,
            matched_by,
            ..
        } => {
            obj.insert("from_external_id".into(), json!(from.0));
            obj.insert("from_name".into(), json!(from_name));
            obj.insert("matched_by".into(), json!(matched_by));
        }
        Change::Orphan {
            scim_id, delete, ..
        } => {
            obj.insert("scim_id".into(), json!(scim_id.0));
            obj.insert(
                "deprovision".into(),
                json!(if *delete { "delete" } else { "deactivate" }),
            );
            obj.insert("reason".into(), json!("no-directory-entry"));
        }
        _ => {}
    }
    Value::Object(obj)
}

pub fn to_json(outcome: &Outcome) -> Value {
    let targets: Vec<Value> = outcome
        .targets
        .iter()
        .map(|t| {
            let mut obj = Map::new();
            obj.insert("target".into(), json!(t.name));
            obj.insert("status".into(), json!(t.status.as_str()));
            if let Some(e) = &t.error {
                obj.insert("error".into(), json!(e.to_string()));
            }
            if let Some(w) = &t.rebuild {
                obj.insert("snapshot_warning".into(), json!(w));
            }
            obj.insert("summary".into(), Summary::of(t).to_json());
            let changes = t.plan.changes.iter().enumerate().map(|(i, c)| {
                let mut json = change_json(t, c);
                if let Some(fp) = t.plan.fingerprints.get(i) {
                    json["fingerprint"] = json!(fp);
                }
                json
            });
            obj.insert("changes".into(), Value::Array(changes.collect()));
            if !t.plan.stale.is_empty() {
                let stale: Vec<Value> = t.plan.stale.iter().map(|s| json!({"action": s.action, "resource": s.resource, "external_id": s.external_id, "name": s.name})).collect();
                obj.insert("stale".into(), Value::Array(stale));
            }
            obj.insert("held".into(), Value::Array(t.plan.held.iter().map(|c| change_json(t, c)).collect()));
            if let Some(r) = &t.plan.held_reason {
                obj.insert("held_reason".into(), json!(r));
            }
            obj.insert("problems".into(), json!(t.plan.problems));
            if !t.plan.not_kept.is_empty() {
                obj.insert("not_kept".into(), json!(t.plan.not_kept));
            }
            if let Some(applied) = &t.applied {
                obj.insert(
                    "applied".into(),
                    json!({"changes": applied.applied, "failures": applied.failures, "write_requests": applied.writes}),
                );
            }
            Value::Object(obj)
        })
        .collect();
    json!({
        "version": 1,
        "source": {"users": outcome.source_users, "groups": outcome.source_groups},
        "targets": targets,
    })
}

fn reason_text(r: &Reason) -> &'static str {
    match r {
        Reason::Left => "no longer in the directory or out of scope",
        Reason::Disabled => "disabled in the directory",
        Reason::GracePeriodOver => "deactivated longer than delete_after",
    }
}

fn short(v: &Option<Value>) -> String {
    match v {
        None => "(none)".into(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(other) => other.to_string(),
    }
}

/// One change on one line: action, resource and name, why (in parentheses) and what it changes.
fn describe(t: &TargetOutcome, c: &Change) -> String {
    let (why, detail) = why_and_detail(t, c);
    let mut line = format!("{} {} {}", c.action(), c.resource(), c.name());
    if !why.is_empty() {
        let _ = write!(line, " ({why})");
    }
    if !detail.is_empty() {
        let _ = write!(line, ": {detail}");
    }
    line
}

/// What a report says of a change besides its action, resource and name: why it is planned (a
/// deprovision's reason, how an account was matched, what an orphan is) and what it changes
/// (attributes, members, the identity an account moves from). Either may be empty.
fn why_and_detail(t: &TargetOutcome, c: &Change) -> (String, String) {
    let detail = match c {
        Change::UpdateUser { changes, .. }
        | Change::DeactivateUser { changes, .. }
        | Change::AdoptUser { changes, .. }
        | Change::AdoptGroup { changes, .. } => attr_changes(changes),
        Change::Rebind {
            id,
            from,
            from_name,
            changes,
            ..
        } => {
            let moved = format!("directory id {} ({from_name}) -> {}", from.0, id.0);
            if changes.is_empty() {
                moved
            } else {
                format!("{moved}; {}", attr_changes(changes))
            }
        }
        Change::UpdateGroup {
            from_name,
            display_name,
            ..
        } => format!("displayName: {from_name:?} -> {display_name:?}"),
        Change::AddMembers { members, .. } | Change::RemoveMembers { members, .. } => {
            let names = member_names(t, members);
            let shown: Vec<_> = names.iter().take(10).cloned().collect();
            let more = names.len().saturating_sub(shown.len());
            format!(
                "{} member(s): {}{}",
                names.len(),
                shown.join(", "),
                if more > 0 {
                    format!(" (+{more} more)")
                } else {
                    String::new()
                }
            )
        }
        _ => String::new(),
    };
    let why = match c {
        Change::DeactivateUser { reason, .. } | Change::DeleteUser { reason, .. } => {
            reason_text(reason).to_string()
        }
        Change::AdoptUser { matched_by, .. }
        | Change::AdoptGroup { matched_by, .. }
        | Change::Rebind { matched_by, .. } => format!("matched by {matched_by}"),
        Change::Orphan {
            id,
            scim_id,
            delete,
            ..
        } => format!(
            "externalId {id}, SCIM id {}: matches no directory entry this target provisions; {} only through approve",
            scim_id.0,
            if *delete { "deleted" } else { "deactivated" }
        ),
        _ => String::new(),
    };
    (why, detail)
}

/// The details cell of a change's Markdown row: what it changes, then why.
fn markdown_details(t: &TargetOutcome, c: &Change) -> String {
    match why_and_detail(t, c) {
        (why, detail) if detail.is_empty() => why,
        (why, detail) if why.is_empty() => detail,
        (why, detail) => format!("{detail} ({why})"),
    }
}

/// `s` as it may appear in a text or Markdown report: characters that move the cursor, end a
/// line, start a terminal escape or reorder the text around them (C0 and C1 controls, DEL,
/// Unicode line and paragraph separators, bidirectional controls) are written as escapes
/// (`\n`, `\u{1b}`), so a directory value cannot break a line or a table row, or fake one.
/// Text without them is returned as it is.
pub(crate) fn one_line(s: &str) -> Cow<'_, str> {
    let breaks = |c: char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.contains(breaks) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if breaks(c) {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`one_line`], with `|` escaped too: one cell of a Markdown table row.
fn md_cell(s: &str) -> String {
    one_line(s).replace('|', "\\|")
}

fn attr_changes(changes: &[crate::plan::AttrChange]) -> String {
    changes
        .iter()
        .map(|a| format!("{}: {} -> {}", a.path, short(&a.from), short(&a.to)))
        .collect::<Vec<_>>()
        .join("; ")
}

fn summary_line(t: &TargetOutcome) -> String {
    let s = Summary::of(t);
    let parts: Vec<String> = s
        .counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{} {n}", k.replace('_', " ")))
        .collect();
    if parts.is_empty() {
        "no changes".into()
    } else {
        parts.join(", ")
    }
}

/// An entry a target could not be given, on one line (text report and sync lines).
fn problem_line(out: &mut String, p: &Problem) {
    let _ = writeln!(
        out,
        "  problem: {} ({}): {}",
        one_line(&p.name),
        one_line(&p.external_id),
        one_line(&p.reason)
    );
}

/// One way of writing the pieces of a dry-run report; [`pieces`] walks the outcome in order.
trait Style {
    fn directory(&self, out: &mut String, outcome: &Outcome);
    /// The target's heading, its error and its warning.
    fn target(&self, out: &mut String, t: &TargetOutcome);
    /// The planned changes, then the held ones with the reason they are held.
    fn changes(&self, out: &mut String, t: &TargetOutcome);
    fn problem(&self, out: &mut String, p: &Problem);
    fn not_kept(&self, out: &mut String, names: &str);
}

fn pieces(style: &impl Style, outcome: &Outcome) -> String {
    let mut out = String::new();
    style.directory(&mut out, outcome);
    for t in &outcome.targets {
        style.target(&mut out, t);
        style.changes(&mut out, t);
        for p in &t.plan.problems {
            style.problem(&mut out, p);
        }
        if !t.plan.not_kept.is_empty() {
            style.not_kept(&mut out, &t.plan.not_kept.join(", "));
        }
    }
    out
}

/// How the directory was read, when a change feed is in use (nothing otherwise).
fn read_note(outcome: &Outcome) -> String {
    let r = &outcome.read;
    let Some(feed) = r.feed else {
        return String::new();
    };
    match r.mode {
        "delta" => format!(
            " (from the {feed} change feed: {} entries changed)",
            r.changes
        ),
        "quiet" => format!(" (from the {feed} change feed: no change)"),
        _ => match &r.why_full {
            Some(why) => format!(" (read in full: {})", one_line(why)),
            None => " (read in full)".to_string(),
        },
    }
}

/// The plain-text report.
struct Text;

impl Style for Text {
    fn directory(&self, out: &mut String, outcome: &Outcome) {
        let _ = writeln!(
            out,
            "Directory: {} users, {} groups{}",
            outcome.source_users,
            outcome.source_groups,
            read_note(outcome)
        );
    }

    fn target(&self, out: &mut String, t: &TargetOutcome) {
        let _ = writeln!(
            out,
            "\nTarget {} [{}]: {}",
            one_line(&t.name),
            t.status.as_str(),
            summary_line(t)
        );
        if let Some(e) = &t.error {
            let _ = writeln!(out, "  error: {}", one_line(&e.to_string()));
        }
        if let Some(w) = &t.rebuild {
            let _ = writeln!(out, "  warning: {w}");
        }
    }

    fn changes(&self, out: &mut String, t: &TargetOutcome) {
        for c in &t.plan.changes {
            let _ = writeln!(out, "  {}", one_line(&describe(t, c)));
        }
        if !t.plan.held.is_empty() {
            let _ = writeln!(
                out,
                "  HELD: {}",
                one_line(t.plan.held_reason.as_deref().unwrap_or(""))
            );
            for c in &t.plan.held {
                let _ = writeln!(out, "    {}", one_line(&describe(t, c)));
            }
        }
    }

    fn problem(&self, out: &mut String, p: &Problem) {
        problem_line(out, p);
    }

    fn not_kept(&self, out: &mut String, names: &str) {
        let _ = writeln!(
            out,
            "  not kept by the target (not planned while it lacks them): {names}"
        );
    }
}

/// The Markdown report: one table of changes per target.
struct Markdown;

impl Style for Markdown {
    fn directory(&self, out: &mut String, outcome: &Outcome) {
        let _ = writeln!(
            out,
            "# ldap2scim plan\n\nDirectory: {} users, {} groups{}.",
            outcome.source_users,
            outcome.source_groups,
            read_note(outcome)
        );
    }

    fn target(&self, out: &mut String, t: &TargetOutcome) {
        let _ = writeln!(
            out,
            "\n## Target `{}`: {}\n\n{}\n",
            one_line(&t.name),
            t.status.as_str(),
            summary_line(t)
        );
        if let Some(e) = &t.error {
            let _ = writeln!(out, "**Error:** {}\n", md_cell(&e.to_string()));
        }
    }

    fn changes(&self, out: &mut String, t: &TargetOutcome) {
        let rows = t
            .plan
            .changes
            .iter()
            .map(|c| (false, c))
            .chain(t.plan.held.iter().map(|c| (true, c)));
        let mut rows = rows.peekable();
        if rows.peek().is_some() {
            let _ = writeln!(
                out,
                "| action | resource | name | details |\n|---|---|---|---|"
            );
        }
        for (held, c) in rows {
            let action = if held {
                format!("{} (held)", c.action())
            } else {
                c.action().to_string()
            };
            let _ = writeln!(
                out,
                "| {action} | {} | {} | {} |",
                c.resource(),
                md_cell(c.name()),
                md_cell(&markdown_details(t, c))
            );
        }
        if let Some(r) = &t.plan.held_reason {
            let _ = writeln!(out, "\nHeld: {}", one_line(r));
        }
    }

    fn problem(&self, out: &mut String, p: &Problem) {
        let _ = writeln!(
            out,
            "\n- problem: {} (`{}`): {}",
            one_line(&p.name),
            one_line(&p.external_id),
            one_line(&p.reason)
        );
    }

    fn not_kept(&self, out: &mut String, names: &str) {
        let _ = writeln!(
            out,
            "\nNot kept by the target (not planned while it lacks them): {names}"
        );
    }
}

/// One line per target after a sync.
pub fn sync_lines(outcome: &Outcome) -> String {
    let mut out = String::new();
    for t in &outcome.targets {
        let applied = t.applied.as_ref();
        let _ = writeln!(
            out,
            "target {}: {} ({}); applied {}, failed {}, held {}, {} write requests",
            one_line(&t.name),
            t.status.as_str(),
            summary_line(t),
            applied.map_or(0, |a| a.applied),
            applied.map_or(0, |a| a.failures.len()),
            t.plan.held.len(),
            applied.map_or(0, |a| a.writes),
        );
        if let Some(e) = &t.error {
            let _ = writeln!(out, "  error: {}", one_line(&e.to_string()));
        }
        for f in applied.map(|a| a.failures.as_slice()).unwrap_or_default() {
            let _ = writeln!(
                out,
                "  failed: {} {} {}: {}",
                f.action,
                f.resource,
                one_line(&f.name),
                one_line(&f.error)
            );
        }
        if let Some(r) = &t.rebuild {
            let _ = writeln!(out, "  warning: {r}");
        }
        for s in &t.plan.stale {
            let _ = writeln!(
                out,
                "  stale: {} {} {}: the directory, the snapshot or the target changed since the plan was saved; not applied (plan again)",
                one_line(&s.action),
                one_line(&s.resource),
                one_line(&s.name)
            );
        }
        if let Some(r) = &t.plan.held_reason {
            let _ = writeln!(out, "  held: {}", one_line(r));
        }
        for c in t
            .plan
            .held
            .iter()
            .filter(|c| matches!(c, Change::Orphan { .. }))
        {
            let _ = writeln!(out, "  {}", describe(t, c));
        }
        for p in &t.plan.problems {
            problem_line(&mut out, p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::model::{DirectoryId, ScimId};
    use crate::outcome::TargetStatus;
    use crate::plan::{AttrChange, Plan, Problem};

    fn outcome() -> Outcome {
        let id = |s: &str| DirectoryId::new(s);
        let plan = Plan {
            changes: vec![
                Change::CreateUser {
                    id: id("u1"),
                    user_name: "jdoe@example.org".into(),
                    attrs: Default::default(),
                },
                Change::UpdateUser {
                    id: id("u2"),
                    scim_id: ScimId("s2".into()),
                    user_name: "ann".into(),
                    changes: vec![AttrChange {
                        path: "title".into(),
                        from: Some(json!("Engineer")),
                        to: Some(json!("Staff Engineer")),
                    }],
                    attrs: Default::default(),
                },
                Change::AddMembers {
                    group: id("g1"),
                    group_name: "eng".into(),
                    members: vec![id("u1"), id("u2")],
                },
            ],
            held: vec![Change::DeleteUser {
                id: id("u3"),
                scim_id: ScimId("s3".into()),
                user_name: "old".into(),
                reason: Reason::Left,
            }],
            held_reason: Some(
                "1 deprovisions exceed max_deprovisions (0) of 3 managed users".into(),
            ),
            problems: vec![],
            not_kept: vec![],
            fingerprints: vec![],
            stale: vec![],
        };
        let names = BTreeMap::from([
            (id("u1"), "jdoe@example.org".to_string()),
            (id("u2"), "ann".to_string()),
        ]);
        Outcome {
            epoch: None,
            run_id: "r1".into(),
            read_duration: Default::default(),
            source_users: 3,
            source_groups: 1,
            targets: vec![TargetOutcome {
                name: "slack".into(),
                elapsed: Default::default(),
                status: TargetStatus::Held,
                error: None,
                plan,
                applied: None,
                names,
                rebuild: None,
            }],
            read: Default::default(),
        }
    }

    #[test]
    fn json_report_has_the_shape_spec_md_gives() {
        let v = to_json(&outcome());
        assert_eq!(
            v,
            json!({
                "version": 1,
                "source": {"users": 3, "groups": 1},
                "targets": [{
                    "target": "slack",
                    "status": "held",
                    "summary": {"users_created": 1, "users_adopted": 0, "users_updated": 1, "users_deactivated": 0,
                                "users_deleted": 0, "groups_created": 0, "groups_adopted": 0, "groups_updated": 0,
                                "groups_deleted": 0, "members_added": 2, "members_removed": 0, "held": 1},
                    "changes": [
                        {"action": "create", "resource": "User", "external_id": "u1", "name": "jdoe@example.org"},
                        {"action": "update", "resource": "User", "external_id": "u2", "name": "ann",
                         "attributes": {"title": {"from": "Engineer", "to": "Staff Engineer"}}},
                        {"action": "add-members", "resource": "Group", "external_id": "g1", "name": "eng",
                         "members": ["jdoe@example.org", "ann"]}
                    ],
                    "held": [{"action": "delete", "resource": "User", "external_id": "u3", "name": "old", "reason": "left"}],
                    "held_reason": "1 deprovisions exceed max_deprovisions (0) of 3 managed users",
                    "problems": []
                }]
            })
        );
    }

    #[test]
    fn a_rebind_names_both_identities_in_every_format() {
        let id = |s: &str| DirectoryId::new(s);
        let mut o = outcome();
        o.targets[0].plan = Plan {
            changes: vec![Change::Rebind {
                id: id("new-id"),
                from: id("old-id"),
                from_name: "alice".into(),
                scim_id: ScimId("s1".into()),
                user_name: "alice".into(),
                matched_by: crate::config::MatchRule::UserName,
                changes: vec![AttrChange {
                    path: "externalId".into(),
                    from: Some(json!("old-id")),
                    to: Some(json!("new-id")),
                }],
                attrs: Default::default(),
            }],
            not_kept: vec!["title".into()],
            ..Plan::default()
        };
        let v = to_json(&o);
        let t = &v["targets"][0];
        assert_eq!(
            t["changes"][0],
            json!({"action": "rebind", "resource": "User", "external_id": "new-id", "name": "alice",
                   "from_external_id": "old-id", "from_name": "alice", "matched_by": "userName",
                   "attributes": {"externalId": {"from": "old-id", "to": "new-id"}}})
        );
        assert_eq!(t["summary"]["users_rebound"], 1);
        assert_eq!(t["not_kept"], json!(["title"]));
        let line = "rebind User alice (matched by userName): directory id old-id (alice) -> new-id; externalId: \"old-id\" -> \"new-id\"";
        let text = render(&o, Format::Text);
        assert!(text.contains(&format!("  {line}\n")), "{text}");
        assert!(text.contains("users rebound 1"), "{text}");
        assert!(
            text.contains("not kept by the target (not planned while it lacks them): title"),
            "{text}"
        );
        let md = render(&o, Format::Markdown);
        assert!(
            md.contains(
                "| rebind | User | alice | directory id old-id (alice) -> new-id; externalId"
            ),
            "{md}"
        );
    }

    #[test]
    fn text_and_markdown_reports_read_as_a_whole() {
        assert_eq!(
            render(&outcome(), Format::Text),
            "Directory: 3 users, 1 groups

Target slack [held]: users created 1, users updated 1, members added 2, held 1
  create User jdoe@example.org
  update User ann: title: \"Engineer\" -> \"Staff Engineer\"
  add-members Group eng: 2 member(s): jdoe@example.org, ann
  HELD: 1 deprovisions exceed max_deprovisions (0) of 3 managed users
    delete User old (no longer in the directory or out of scope)
"
        );
        assert_eq!(
            render(&outcome(), Format::Markdown),
            "# ldap2scim plan

Directory: 3 users, 1 groups.

## Target `slack`: held

users created 1, users updated 1, members added 2, held 1

| action | resource | name | details |
|---|---|---|---|
| create | User | jdoe@example.org |  |
| update | User | ann | title: \"Engineer\" -> \"Staff Engineer\" |
| add-members | Group | eng | 2 member(s): jdoe@example.org, ann |
| delete (held) | User | old | no longer in the directory or out of scope |

Held: 1 deprovisions exceed max_deprovisions (0) of 3 managed users
"
        );
    }

    #[test]
    fn a_markdown_row_says_why_a_user_is_deprovisioned() {
        let id = |s: &str| DirectoryId::new(s);
        let mut o = outcome();
        o.targets[0].plan = Plan {
            changes: vec![Change::DeactivateUser {
                id: id("u4"),
                scim_id: ScimId("s4".into()),
                user_name: "bob".into(),
                reason: Reason::Disabled,
                changes: vec![AttrChange {
                    path: "active".into(),
                    from: Some(json!(true)),
                    to: Some(json!(false)),
                }],
                attrs: Default::default(),
            }],
            held: vec![Change::Orphan {
                id: id("u5"),
                scim_id: ScimId("s5".into()),
                user_name: "gone".into(),
                delete: false,
            }],
            ..Plan::default()
        };
        let md = render(&o, Format::Markdown);
        assert!(
            md.contains(
                "| deactivate | User | bob | active: true -> false (disabled in the directory) |\n"
            ),
            "{md}"
        );
        assert!(
            md.contains("| orphan (held) | User | gone | externalId u5, SCIM id s5: matches no directory entry this target provisions; deactivated only through approve |\n"),
            "{md}"
        );
        // The text report says the same on one line.
        let text = render(&o, Format::Text);
        assert!(
            text.contains(
                "  deactivate User bob (disabled in the directory): active: true -> false\n"
            ),
            "{text}"
        );
    }

    /// Directory values with every kind of control character, `|` and a fake row in names,
    /// members, attribute values and problems.
    fn hostile_outcome() -> Outcome {
        let id = |s: &str| DirectoryId::new(s);
        let mut o = outcome();
        let evil = "eve\n  delete User ceo\r\t\u{1b}[2J\u{7f}\u{85}\u{2028}\u{202e}x";
        let t = &mut o.targets[0];
        t.plan.changes = vec![
            Change::CreateUser {
                id: id("u1"),
                user_name: evil.into(),
                attrs: Default::default(),
            },
            Change::UpdateUser {
                id: id("u2"),
                scim_id: ScimId("s2".into()),
                user_name: "ann".into(),
                changes: vec![AttrChange {
                    path: "title".into(),
                    from: Some(json!("a | b")),
                    to: Some(json!(evil)),
                }],
                attrs: Default::default(),
            },
            Change::AddMembers {
                group: id("g1"),
                group_name: "eng\n| delete | User | ceo |".into(),
                members: vec![id("u1"), id("u2")],
            },
        ];
        t.names.insert(id("u1"), evil.into());
        t.plan.problems = vec![Problem {
            external_id: "u9".into(),
            name: "uid=x\ny,dc=x".into(),
            reason: "its title is\nbroken".into(),
            fails: true,
        }];
        o
    }

    /// No character that moves the cursor or ends a line is left, but the line ends.
    fn assert_clean(report: &str) {
        for line in report.lines() {
            assert!(
                !line
                    .contains(|c: char| c.is_control()
                        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202e}')),
                "{line:?}"
            );
        }
        assert!(!report.contains('\r'), "{report:?}");
    }

    #[test]
    fn control_characters_cannot_break_or_fake_a_line_of_a_text_report() {
        let text = render(&hostile_outcome(), Format::Text);
        assert_clean(&text);
        let lines: Vec<&str> = text.lines().collect();
        // Exactly the lines of the same report without the hostile values.
        assert_eq!(lines.len(), 9, "{text}");
        assert!(
            lines
                .iter()
                .all(|l| !l.trim_start().starts_with("delete User ceo")),
            "{text}"
        );
        assert_eq!(
            lines[3],
            r"  create User eve\n  delete User ceo\r\t\u{1b}[2J\u{7f}\u{85}\u{2028}\u{202e}x"
        );
        assert!(
            lines[5].starts_with(
                r"  add-members Group eng\n| delete | User | ceo |: 2 member(s): eve\n"
            ),
            "{}",
            lines[5]
        );
        assert_eq!(
            lines[8],
            r"  problem: uid=x\ny,dc=x (u9): its title is\nbroken"
        );
    }

    #[test]
    fn control_characters_and_pipes_cannot_break_a_markdown_table() {
        let md = render(&hostile_outcome(), Format::Markdown);
        assert_clean(&md);
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
        // Header, separator, three changes and the held one: one line each, four cells each.
        assert_eq!(rows.len(), 6, "{md}");
        for row in &rows {
            let cells = row.replace("\\|", "").matches('|').count();
            assert_eq!(cells, 5, "{row}");
        }
        assert!(
            rows[4].contains(r"eng\n\| delete \| User \| ceo \|"),
            "{}",
            rows[4]
        );
        assert!(
            md.contains(r"- problem: uid=x\ny,dc=x (`u9`): its title is\nbroken"),
            "{md}"
        );
        // The same report with nothing hostile in it is unchanged by the escaping.
        assert_eq!(one_line("plain | text: ü"), "plain | text: ü");
        assert!(matches!(one_line("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn sync_lines_are_one_line_per_fact() {
        let lines = sync_lines(&hostile_outcome());
        assert_clean(&lines);
        assert_eq!(lines.lines().count(), 3, "{lines}");
    }
}
