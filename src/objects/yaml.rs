//! Package text (YAML, or JSON as a subset of it) to a JSON value plus the
//! line of every node, so that validation errors can name file, line and
//! field. Anchors and aliases are refused (no alias bombs), and depth, node
//! count and input size are bounded.

use saphyr_parser::{Event, Parser, ScalarStyle};
use serde_json::{Map, Number, Value};
use std::collections::HashMap;

/// Largest package text accepted.
pub const MAX_TEXT: usize = 1 << 20;
const MAX_DEPTH: usize = 64;
const MAX_NODES: usize = 100_000;

/// A parsed document: the value and where each of its nodes starts.
#[derive(Debug, Clone)]
pub struct Marked {
    pub value: Value,
    /// Path as `serde_path_to_error` prints it (`a.b[2].c`, `.` for the
    /// root) to its 1-based line.
    lines: HashMap<String, usize>,
}

impl Marked {
    /// The line of `path`, or of its nearest ancestor the map knows.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path.to_string();
        loop {
            if let Some(l) = self.lines.get(&p) {
                return Some(*l);
            }
            // Drop the last segment: `a.b[2]` -> `a.b`, `a.b` -> `a`.
            let cut = p.rfind(['.', '[']);
            match cut {
                Some(i) if i > 0 => p.truncate(i),
                _ => return self.lines.get(".").copied(),
            }
        }
    }
}

/// Where and why the text is not YAML.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

enum Frame {
    Seq(Vec<Value>, String),
    /// The map, its path, and the key waiting for its value.
    Map(Map<String, Value>, String, Option<String>),
}

fn join(parent: &str, seg: &Seg) -> String {
    match seg {
        Seg::Index(i) if parent == "." => format!("[{i}]"),
        Seg::Index(i) => format!("{parent}[{i}]"),
        Seg::Key(k) if parent == "." => k.clone(),
        Seg::Key(k) => format!("{parent}.{k}"),
    }
}

enum Seg {
    Index(usize),
    Key(String),
}

/// Resolves a plain scalar the way YAML 1.2's core schema does.
fn plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = s.parse::<i64>() {
        return Value::Number(i.into());
    }
    let numeric = s
        .bytes()
        .all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'+' | b'e' | b'E'))
        && s.bytes().any(|c| c.is_ascii_digit());
    if numeric {
        if let Some(n) = s.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(s.to_string())
}

/// Parses one YAML document (JSON is YAML too).
pub fn parse(text: &str) -> Result<Marked, SyntaxError> {
    if text.len() > MAX_TEXT {
        return Err(SyntaxError {
            line: 1,
            col: 0,
            message: format!("{} bytes, at most {MAX_TEXT}", text.len()),
        });
    }
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut lines: HashMap<String, usize> = HashMap::new();
    let mut root: Option<Value> = None;
    let mut nodes = 0usize;
    let mut docs = 0usize;
    let err = |line: usize, col: usize, m: &str| SyntaxError {
        line,
        col,
        message: m.to_string(),
    };
    while let Some(ev) = parser.next_event() {
        let (ev, span) = ev.map_err(|e| SyntaxError {
            line: e.marker().line(),
            col: e.marker().col(),
            message: e.info().to_string(),
        })?;
        let (line, col) = (span.start.line(), span.start.col());
        // The path of a node starting now, and whether it is a map key.
        let (path, is_key) = match stack.last() {
            None => (".".to_string(), false),
            Some(Frame::Seq(v, p)) => (join(p, &Seg::Index(v.len())), false),
            Some(Frame::Map(_, p, None)) => (p.clone(), true),
            Some(Frame::Map(_, p, Some(k))) => (join(p, &Seg::Key(k.clone())), false),
        };
        let value = match ev {
            Event::StreamStart | Event::StreamEnd | Event::Nothing => continue,
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    return Err(err(line, col, "more than one document in the file"));
                }
                continue;
            }
            Event::DocumentEnd => continue,
            Event::Alias(_) => {
                return Err(err(line, col, "aliases (*name) are not supported"));
            }
            Event::Scalar(s, style, anchor, _) => {
                if anchor != 0 {
                    return Err(err(line, col, "anchors (&name) are not supported"));
                }
                if is_key {
                    if let Some(Frame::Map(m, _, k)) = stack.last_mut() {
                        if m.contains_key(s.as_ref()) {
                            return Err(err(line, col, &format!("duplicate key {s:?}")));
                        }
                        *k = Some(s.to_string());
                    }
                    continue;
                }
                match style {
                    ScalarStyle::Plain => plain(&s),
                    _ => Value::String(s.to_string()),
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if anchor != 0 {
                    return Err(err(line, col, "anchors (&name) are not supported"));
                }
                if is_key {
                    return Err(err(line, col, "map keys must be plain strings"));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(err(line, col, "nested deeper than 64 levels"));
                }
                nodes += 1;
                if nodes > MAX_NODES {
                    return Err(err(line, col, "more than 100000 nodes"));
                }
                lines.insert(path.clone(), line);
                if matches!(ev, Event::SequenceStart(..)) {
                    stack.push(Frame::Seq(Vec::new(), path));
                } else {
                    stack.push(Frame::Map(Map::new(), path, None));
                }
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq(v, _)) => Value::Array(v),
                Some(Frame::Map(m, _, _)) => Value::Object(m),
                None => return Err(err(line, col, "unbalanced document")),
            },
        };
        if !matches!(value, Value::Array(_) | Value::Object(_)) {
            nodes += 1;
            if nodes > MAX_NODES {
                return Err(err(line, col, "more than 100000 nodes"));
            }
            lines.insert(path, line);
        }
        match stack.last_mut() {
            None => root = Some(value),
            Some(Frame::Seq(v, _)) => v.push(value),
            Some(Frame::Map(m, _, k)) => {
                if let Some(k) = k.take() {
                    m.insert(k, value);
                }
            }
        }
    }
    Ok(Marked {
        value: root.unwrap_or(Value::Null),
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_to_json_with_lines() {
        let text = "name: video\nclasses:\n  - name: Video\n    state:\n      fields:\n        - {name: title, type: string}\n  - name: Hd\n    parent: Video\n";
        let m = parse(text).unwrap();
        assert_eq!(m.value["name"], "video");
        assert_eq!(m.value["classes"][1]["parent"], "Video");
        assert_eq!(
            m.value["classes"][0]["state"]["fields"][0]["type"],
            "string"
        );
        assert_eq!(m.line_of("name"), Some(1));
        assert_eq!(m.line_of("classes[1].parent"), Some(8));
        assert_eq!(m.line_of("classes[0].state.fields[0].name"), Some(6));
        // Unknown paths fall back to the nearest known ancestor.
        assert_eq!(m.line_of("classes[1].functions[3].image"), Some(7));
    }

    #[test]
    fn scalars_resolve_like_yaml_core() {
        let m = parse("a: 1\nb: 1.5\nc: true\nd: ~\ne: '1'\nf: hello\ng: -3\n").unwrap();
        assert_eq!(m.value["a"], 1);
        assert_eq!(m.value["b"], 1.5);
        assert_eq!(m.value["c"], true);
        assert!(m.value["d"].is_null());
        assert_eq!(m.value["e"], "1");
        assert_eq!(m.value["f"], "hello");
        assert_eq!(m.value["g"], -3);
    }

    #[test]
    fn json_parses_too() {
        let m = parse("{\"name\": \"p\", \"classes\": [{\"name\": \"A\"}]}").unwrap();
        assert_eq!(m.value["classes"][0]["name"], "A");
    }

    #[test]
    fn hostile_text_is_refused_with_a_position() {
        let e = parse("a: &x [1, 2]\nb: *x\n").unwrap_err();
        assert!(e.message.contains("anchors"), "{e:?}");
        assert_eq!(e.line, 1);
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert!(e.message.contains("duplicate"), "{e:?}");
        assert_eq!(e.line, 2);
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.line >= 1, "{e:?}");
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(parse(&deep).unwrap_err().message.contains("deeper"));
        let e = parse("---\na: 1\n---\nb: 2\n").unwrap_err();
        assert!(e.message.contains("more than one document"));
    }
}
