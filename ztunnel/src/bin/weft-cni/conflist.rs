//! Editing a CNI conflist as text: our entry is appended to (or dropped
//! from) the top-level `plugins` array and everything else keeps its bytes,
//! so other plugins' settings stay exactly as their owner wrote them, a
//! second install produces the same file, and a removal restores the
//! original. The document must be valid JSON; it is parsed once to be sure,
//! then scanned for the spans of the array's elements.

use serde_json::Value;

/// Why a conflist cannot take the chained entry.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("not valid JSON: {0}")]
    NotJson(String),
    #[error("no top-level \"plugins\" list")]
    NoPlugins,
    #[error("no plugin in the chain besides weft-cni")]
    NothingToChainAfter,
}

pub enum Mode<'a> {
    /// Append this entry (one line of JSON), replacing any earlier one.
    Install(&'a str),
    Remove,
}

/// Whether a plugin entry is ours.
fn is_weft(element: &str) -> bool {
    serde_json::from_str::<Value>(element)
        .ok()
        .and_then(|v| {
            v.get("type")
                .and_then(Value::as_str)
                .map(|t| t == "weft-cni")
        })
        .unwrap_or(false)
}

/// The document with our entry installed or removed. Trailing newlines of
/// `doc` are not part of the text compared or kept; the result ends with
/// exactly one.
pub fn rewrite(doc: &str, mode: Mode<'_>) -> Result<String, EditError> {
    let doc = doc.trim_end_matches('\n');
    let value: Value = serde_json::from_str(doc).map_err(|e| EditError::NotJson(e.to_string()))?;
    if !value.get("plugins").is_some_and(Value::is_array) {
        return Err(EditError::NoPlugins);
    }
    let b = doc.as_bytes();
    let (open, elements, close) = plugins_array(b).ok_or(EditError::NoPlugins)?;
    let kept: Vec<&str> = elements
        .iter()
        .map(|&(s, e)| &doc[s..e])
        .filter(|t| !t.trim().is_empty() && !is_weft(t))
        .collect();
    if kept.is_empty() {
        return Err(EditError::NothingToChainAfter);
    }
    // The whitespace before the closing bracket stays where it was, so a
    // second run produces the same text and a removal restores the original.
    let last = elements.last().map(|&(s, e)| &doc[s..e]).unwrap_or("");
    let trail = &last[last.trim_end().len()..];
    let kept = kept.join(",");
    let kept = kept.trim_end();
    let (head, rest) = (&doc[..=open], &doc[close + 1..]);
    Ok(match mode {
        Mode::Install(entry) => format!("{head}{kept},\n    {entry}{trail}]{rest}\n"),
        Mode::Remove => format!("{head}{kept}{trail}]{rest}\n"),
    })
}

/// Offset of the `[`, spans of the elements, offset of the `]`.
type ArraySpans = (usize, Vec<(usize, usize)>, usize);

/// In a valid JSON document: the offset of the `[` of the top-level
/// `plugins` array, the spans of its elements (with their surrounding
/// whitespace, split at the separating commas) and the offset of its `]`.
fn plugins_array(b: &[u8]) -> Option<ArraySpans> {
    let mut i = ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = ws(b, i);
        if b.get(i) == Some(&b'}') {
            return None;
        }
        let key_end = string_end(b, i)?;
        let key: String = serde_json::from_slice(&b[i..key_end]).ok()?;
        i = ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = ws(b, i + 1);
        if key == "plugins" && b.get(i) == Some(&b'[') {
            let open = i;
            let mut elements = Vec::new();
            let mut start = open + 1;
            let mut j = ws(b, start);
            if b.get(j) == Some(&b']') {
                elements.push((start, j));
                return Some((open, elements, j));
            }
            loop {
                j = ws(b, value_end(b, ws(b, j))?);
                elements.push((start, j));
                match b.get(j)? {
                    b',' => {
                        start = j + 1;
                        j = start;
                    }
                    b']' => return Some((open, elements, j)),
                    _ => return None,
                }
            }
        }
        i = ws(b, value_end(b, i)?);
        match b.get(i)? {
            b',' => i += 1,
            _ => return None,
        }
    }
}

fn ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// End (exclusive) of the string starting at `i`.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    loop {
        match b.get(j)? {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
}

/// End (exclusive) of the value starting at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while b
                .get(j)
                .is_some_and(|c| !matches!(c, b',' | b']' | b'}') && !c.is_ascii_whitespace())
            {
                j += 1;
            }
            Some(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: &str = r#"{"type":"weft-cni","ztunnel_socket":"/s"}"#;

    fn chain(doc: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(doc).unwrap();
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn install_twice_is_stable_and_remove_restores() {
        let original = "{\n  \"cniVersion\": \"1.0.0\",\n  \"plugins\": [\n    {\"type\": \"ptp\", \"ipam\": {\"ranges\": [[{\"subnet\": \"10.0.0.0/24\"}]]}},\n    {\"type\": \"portmap\"}\n  ]\n}\n";
        let once = rewrite(original, Mode::Install(ENTRY)).unwrap();
        assert_eq!(chain(&once), ["ptp", "portmap", "weft-cni"]);
        assert_eq!(rewrite(&once, Mode::Install(ENTRY)).unwrap(), once);
        assert_eq!(rewrite(&once, Mode::Remove).unwrap(), original);
    }

    #[test]
    fn strings_with_brackets_quotes_and_a_plugins_value_elsewhere() {
        let original = r#"{"name":"plugins","x":{"plugins":"no"},"plugins":[{"type":"bridge","note":"a \"quoted\" ] and } and \\"},{"type":"tuning","plugins":["nested"]}],"after":"ok"}"#;
        let once = rewrite(original, Mode::Install(ENTRY)).unwrap();
        assert_eq!(chain(&once), ["bridge", "tuning", "weft-cni"]);
        let v: Value = serde_json::from_str(&once).unwrap();
        assert_eq!(v["after"], "ok");
        assert_eq!(v["x"]["plugins"], "no");
        assert_eq!(
            rewrite(&once, Mode::Remove).unwrap(),
            format!("{original}\n")
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(
            rewrite(r#"{"type":"bridge"}"#, Mode::Install(ENTRY)),
            Err(EditError::NoPlugins)
        );
        assert_eq!(
            rewrite(r#"{"plugins":[]}"#, Mode::Install(ENTRY)),
            Err(EditError::NothingToChainAfter)
        );
        assert_eq!(
            rewrite(&format!(r#"{{"plugins":[{ENTRY}]}}"#), Mode::Install(ENTRY)),
            Err(EditError::NothingToChainAfter)
        );
        assert!(matches!(
            rewrite(r#"{"plugins":[{"type":"a"},]}"#, Mode::Install(ENTRY)),
            Err(EditError::NotJson(_))
        ));
    }
}
