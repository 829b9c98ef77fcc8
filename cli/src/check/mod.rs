//! `weftctl check`: grouped checks, one line each with √ (passed), ‼
//! (warning) or × (error), a hint under every failure, exit code 0, 1 (an
//! error) or 2 (warnings only, with `--strict`), or JSON with `-o json`.
//! `--pre` checks a cluster before install; without it, an installed mesh.

pub mod cluster;
pub mod netpol;
pub mod node;
pub mod pre;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Error,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Check {
    pub fn ok(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Ok,
            detail: None,
            hint: None,
        }
    }

    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::failed(Status::Warning, name.into(), detail.into(), hint.into())
    }

    pub fn error(
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::failed(Status::Error, name.into(), detail.into(), hint.into())
    }

    fn failed(status: Status, name: String, detail: String, hint: String) -> Self {
        Self {
            name,
            status,
            detail: Some(detail),
            hint: Some(hint),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Group {
    pub name: String,
    pub checks: Vec<Check>,
}

impl Group {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            checks: Vec::new(),
        }
    }

    pub fn push(&mut self, c: Check) {
        self.checks.push(c);
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub groups: Vec<Group>,
    pub errors: usize,
    pub warnings: usize,
}

impl Report {
    pub fn add(&mut self, g: Group) {
        for c in &g.checks {
            match c.status {
                Status::Ok => {}
                Status::Warning => self.warnings += 1,
                Status::Error => self.errors += 1,
            }
        }
        self.groups.push(g);
    }

    /// 1 with any error; 2 with warnings only when `strict`; else 0.
    pub fn exit_code(&self, strict: bool) -> u8 {
        if self.errors > 0 {
            1
        } else if strict && self.warnings > 0 {
            2
        } else {
            0
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for g in &self.groups {
            out += &format!("{}\n{}\n", g.name, "-".repeat(g.name.chars().count()));
            for c in &g.checks {
                let mark = match c.status {
                    Status::Ok => "√",
                    Status::Warning => "‼",
                    Status::Error => "×",
                };
                out += &format!("{mark} {}", c.name);
                if let Some(d) = &c.detail {
                    out += &format!(": {d}");
                }
                out += "\n";
                if let Some(h) = &c.hint {
                    out += &format!("    hint: {h}\n");
                }
            }
            out += "\n";
        }
        out += &match (self.errors, self.warnings) {
            (0, 0) => "Status check results are √\n".to_owned(),
            (0, w) => format!("Status check results are ‼ ({w} warning(s))\n"),
            (e, w) => format!("Status check results are × ({e} error(s), {w} warning(s))\n"),
        };
        out
    }
}

/// Shows which group is being checked when stderr is a terminal.
pub fn progress(group: &str) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprintln!("checking {group}...");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_marks() {
        let mut r = Report::default();
        let mut g = Group::new("Things");
        g.push(Check::ok("fine"));
        g.push(Check::warn("meh", "a bit off", "look at it"));
        r.add(g);
        assert_eq!(r.exit_code(false), 0);
        assert_eq!(r.exit_code(true), 2);
        let text = r.render();
        assert!(text.contains("√ fine\n"), "{text}");
        assert!(
            text.contains("‼ meh: a bit off\n    hint: look at it\n"),
            "{text}"
        );
        let mut g = Group::new("More");
        g.push(Check::error("bad", "broken", "fix it"));
        r.add(g);
        assert_eq!(r.exit_code(false), 1);
        assert!(r.render().contains("× bad: broken"));
    }
}
