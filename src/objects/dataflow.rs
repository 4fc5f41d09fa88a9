//! MACRO functions: a DAG of steps, each a call of a function on an object
//! (the calling object, an object id passed in the arguments, or the object
//! an earlier step created). Step arguments may reference `${self.id}`,
//! `${args}`, `${args.NAME}`, `${STEP.id}`, `${STEP.output}` and
//! `${STEP.output.FIELD}`. Validation refuses unknown references and cycles;
//! [`MacroRun`] is the sans-IO orchestrator the calling object's root drives:
//! it hands out every step whose inputs are ready (independent steps run in
//! parallel) and with `immutable` pre-generates each step's output object
//! id from the invocation id, so a re-run step writes the same object.

use super::package::{Class, Errors};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Most steps in one MACRO.
pub const MAX_STEPS: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    id: String,
    function: String,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    args: Option<Map<String, Value>>,
}

/// The object a step calls its function on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// The object the MACRO was called on.
    This,
    /// An object id passed in the call's arguments under this name.
    Arg(String),
    /// The object created by an earlier step.
    Step(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub id: String,
    pub function: String,
    pub target: Target,
    pub args: Map<String, Value>,
    /// Indices of the steps this one needs.
    pub deps: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Macro {
    pub steps: Vec<Step>,
    /// Steps grouped by depth: every step of wave n depends only on steps
    /// of earlier waves.
    pub waves: Vec<Vec<usize>>,
    /// The step whose output is the MACRO's output (default: the last).
    pub result: Option<String>,
    /// Pre-generate output object ids so re-running a step is idempotent.
    pub immutable: bool,
}

/// A reference inside a step argument.
#[derive(Clone, Debug, PartialEq)]
enum Ref {
    SelfId,
    Args(Option<String>),
    StepId(String),
    StepOutput(String, Option<String>),
}

fn parse_ref(s: &str) -> Result<Option<Ref>, String> {
    if !s.contains("${") {
        return Ok(None);
    }
    let inner = s
        .strip_prefix("${")
        .and_then(|r| r.strip_suffix('}'))
        .filter(|r| !r.contains("${") && !r.contains('}'))
        .ok_or_else(|| {
            format!("{s:?}: a reference must be the whole string, as \"${{step.output}}\"")
        })?;
    let parts: Vec<&str> = inner.split('.').collect();
    Ok(Some(match parts.as_slice() {
        ["self", "id"] => Ref::SelfId,
        ["args"] => Ref::Args(None),
        ["args", n] => Ref::Args(Some(n.to_string())),
        [s, "id"] => Ref::StepId(s.to_string()),
        [s, "output"] => Ref::StepOutput(s.to_string(), None),
        [s, "output", f] => Ref::StepOutput(s.to_string(), Some(f.to_string())),
        _ => {
            return Err(format!(
                "{s:?}: expected ${{self.id}}, ${{args}}, ${{args.NAME}}, ${{STEP.id}}, ${{STEP.output}} or ${{STEP.output.FIELD}}"
            ))
        }
    }))
}

/// Every reference in `v`, depth first.
fn refs(v: &Value, out: &mut Vec<Result<Ref, String>>) {
    match v {
        Value::String(s) => match parse_ref(s) {
            Ok(Some(r)) => out.push(Ok(r)),
            Ok(None) => {}
            Err(e) => out.push(Err(e)),
        },
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        Value::Object(m) => m.values().for_each(|x| refs(x, out)),
        _ => {}
    }
}

pub(crate) fn build(
    raw: &[RawStep],
    result: Option<&str>,
    immutable: bool,
    at: &str,
    errs: &mut Errors,
) -> Option<super::dataflow::Macro> {
    let before = errs.list.len();
    if raw.is_empty() || raw.len() > MAX_STEPS {
        errs.add(
            &format!("{at}.steps"),
            format!("a MACRO has 1 to {MAX_STEPS} steps"),
        );
        return None;
    }
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, s) in raw.iter().enumerate() {
        let sa = format!("{at}.steps[{i}]");
        if !super::package::is_ident(&s.id) || s.id == "self" || s.id == "args" {
            errs.add(
                &format!("{sa}.id"),
                format!(
                    "{:?} is not a step id (an identifier other than self and args)",
                    s.id
                ),
            );
        }
        if index.insert(&s.id, i).is_some() {
            errs.add(
                &format!("{sa}.id"),
                format!("step {:?} is defined twice", s.id),
            );
        }
        if !super::package::is_ident(&s.function) {
            errs.add(
                &format!("{sa}.function"),
                format!("{:?} is not a function name", s.function),
            );
        }
    }
    let mut steps = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let sa = format!("{at}.steps[{i}]");
        let mut deps = Vec::new();
        let need = |name: &str, field: &str, errs: &mut Errors, deps: &mut Vec<usize>| match index
            .get(name)
        {
            Some(&j) if j == i => errs.add(field, format!("step {name:?} refers to itself")),
            Some(&j) => {
                if !deps.contains(&j) {
                    deps.push(j)
                }
            }
            None => errs.add(field, format!("no step {name:?} in this MACRO")),
        };
        let target = match s.target.as_deref() {
            None | Some("self") => Target::This,
            Some(t) => match t.strip_prefix("args.") {
                Some(a) if super::package::is_ident(a) => Target::Arg(a.to_string()),
                Some(_) => {
                    errs.add(
                        &format!("{sa}.target"),
                        format!("{t:?}: expected args.NAME"),
                    );
                    Target::This
                }
                None => {
                    need(t, &format!("{sa}.target"), errs, &mut deps);
                    Target::Step(t.to_string())
                }
            },
        };
        let args = s.args.clone().unwrap_or_default();
        let mut found = Vec::new();
        refs(&Value::Object(args.clone()), &mut found);
        for r in found {
            match r {
                Err(e) => errs.add(&format!("{sa}.args"), e),
                Ok(Ref::StepId(n) | Ref::StepOutput(n, _)) => {
                    need(&n, &format!("{sa}.args"), errs, &mut deps)
                }
                Ok(_) => {}
            }
        }
        steps.push(Step {
            id: s.id.clone(),
            function: s.function.clone(),
            target,
            args,
            deps,
        });
    }
    if let Some(r) = result {
        if !index.contains_key(r) {
            errs.add(
                &format!("{at}.result"),
                format!("no step {r:?} in this MACRO"),
            );
        }
    }
    if errs.list.len() > before {
        return None;
    }
    // Kahn's algorithm, by waves; what is left over lies on a cycle.
    let n = steps.len();
    let mut indeg: Vec<usize> = steps.iter().map(|s| s.deps.len()).collect();
    let mut done = vec![false; n];
    let mut waves = Vec::new();
    loop {
        let wave: Vec<usize> = (0..n).filter(|&i| !done[i] && indeg[i] == 0).collect();
        if wave.is_empty() {
            break;
        }
        for &i in &wave {
            done[i] = true;
        }
        for (j, s) in steps.iter().enumerate() {
            if !done[j] {
                indeg[j] -= s.deps.iter().filter(|d| wave.contains(d)).count();
            }
        }
        waves.push(wave);
    }
    if let Some(first) = (0..n).find(|&i| !done[i]) {
        let cycle = find_cycle(&steps, first, &done);
        errs.add(
            &format!("{at}.steps[{first}]"),
            format!("the steps form a cycle: {}", cycle.join(" -> ")),
        );
        return None;
    }
    Some(Macro {
        steps,
        waves,
        result: result.map(str::to_string),
        immutable,
    })
}

/// Follows dependencies from `start` among unfinished steps until one
/// repeats: the names along the cycle.
fn find_cycle(steps: &[Step], start: usize, done: &[bool]) -> Vec<String> {
    let mut path = vec![start];
    let mut cur = start;
    loop {
        let Some(&next) = steps[cur].deps.iter().find(|d| !done[**d]) else {
            return path.iter().map(|&i| steps[i].id.clone()).collect();
        };
        if let Some(pos) = path.iter().position(|&p| p == next) {
            let mut names: Vec<String> = path[pos..].iter().map(|&i| steps[i].id.clone()).collect();
            names.push(steps[next].id.clone());
            return names;
        }
        path.push(next);
        cur = next;
    }
}

/// Checks what can be known before running: each step's function exists
/// on its target's class (when the class is known) and a step used as a
/// target creates an object.
pub(crate) fn check_targets(
    m: &Macro,
    name: &str,
    class: &str,
    classes: &BTreeMap<String, Class>,
    at: &str,
    errs: &mut Errors,
) {
    // Class of each step's target and of the object each step creates.
    let mut creates: Vec<Option<String>> = vec![None; m.steps.len()];
    for wave in &m.waves {
        for &i in wave {
            let s = &m.steps[i];
            let sa = format!("{at}.steps[{i}]");
            let target_class = match &s.target {
                Target::This => Some(class.to_string()),
                Target::Arg(_) => None,
                Target::Step(t) => {
                    let j = m.steps.iter().position(|x| &x.id == t);
                    match j.and_then(|j| creates[j].clone()) {
                        Some(c) => Some(c),
                        None => {
                            errs.add(
                                &format!("{sa}.target"),
                                format!("step {t:?} creates no object (its function has no output class)"),
                            );
                            None
                        }
                    }
                }
            };
            let Some(tc) = target_class else { continue };
            match classes.get(&tc).and_then(|c| c.functions.get(&s.function)) {
                Some(f) => {
                    if s.function == name && s.target == Target::This {
                        errs.add(
                            &format!("{sa}.function"),
                            format!(
                                "step calls MACRO {name} on the same object: it would never end"
                            ),
                        );
                    }
                    creates[i] = f.output.clone();
                }
                None => errs.add(
                    &format!("{sa}.function"),
                    format!("class {tc} has no function {:?}", s.function),
                ),
            }
        }
    }
}

// ---- running ---------------------------------------------------------------

/// One step call the orchestrator must make.
#[derive(Clone, Debug, PartialEq)]
pub struct StepCall {
    pub index: usize,
    pub step: String,
    /// The object to call, or `None` when the target could not be resolved
    /// (the run then fails with [`MacroRun::failed`]).
    pub object: String,
    pub function: String,
    pub args: Value,
    /// With `immutable`: the id the created object must get.
    pub output_id: Option<String>,
}

/// What a finished step returned.
#[derive(Clone, Debug, PartialEq)]
pub struct StepResult {
    /// The object the step created, if its function has an output class.
    pub created: Option<String>,
    pub output: Value,
}

/// The orchestrator of one MACRO call (sans-IO).
pub struct MacroRun {
    m: Macro,
    self_id: String,
    args: Value,
    inv: String,
    started: Vec<bool>,
    results: Vec<Option<StepResult>>,
    error: Option<String>,
}

impl MacroRun {
    /// `inv` identifies this invocation; with `immutable` it seeds the
    /// output ids, so a retried invocation reuses them.
    pub fn new(m: Macro, self_id: &str, args: Value, inv: &str) -> MacroRun {
        let n = m.steps.len();
        MacroRun {
            m,
            self_id: self_id.to_string(),
            args,
            inv: inv.to_string(),
            started: vec![false; n],
            results: vec![None; n],
            error: None,
        }
    }

    /// The id a step's output object gets under `immutable`.
    pub fn output_id(inv: &str, step: &str) -> String {
        let h = crate::id::NodeId::hash_parts(&[
            b"capy-macro-output\0",
            inv.as_bytes(),
            b"\0",
            step.as_bytes(),
        ]);
        format!("{:032x}", h.0)
    }

    fn resolve(&self, v: &Value) -> Result<Value, String> {
        Ok(match v {
            Value::String(s) => match parse_ref(s)? {
                None => v.clone(),
                Some(Ref::SelfId) => Value::String(self.self_id.clone()),
                Some(Ref::Args(None)) => self.args.clone(),
                Some(Ref::Args(Some(n))) => self.args.get(&n).cloned().unwrap_or(Value::Null),
                Some(Ref::StepId(s)) => {
                    let r = self.result_of(&s)?;
                    match &r.created {
                        Some(id) => Value::String(id.clone()),
                        None => return Err(format!("step {s} created no object")),
                    }
                }
                Some(Ref::StepOutput(s, f)) => {
                    let r = self.result_of(&s)?;
                    match f {
                        None => r.output.clone(),
                        Some(f) => r.output.get(&f).cloned().unwrap_or(Value::Null),
                    }
                }
            },
            Value::Array(a) => Value::Array(
                a.iter()
                    .map(|x| self.resolve(x))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, x)| Ok((k.clone(), self.resolve(x)?)))
                    .collect::<Result<_, String>>()?,
            ),
            _ => v.clone(),
        })
    }

    fn result_of(&self, step: &str) -> Result<&StepResult, String> {
        self.m
            .steps
            .iter()
            .position(|s| s.id == step)
            .and_then(|i| self.results[i].as_ref())
            .ok_or_else(|| format!("step {step} has not finished"))
    }

    /// Steps whose inputs are all ready and that were not handed out yet.
    /// A step whose target or arguments cannot be resolved fails the run.
    pub fn ready(&mut self) -> Vec<StepCall> {
        if self.error.is_some() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for i in 0..self.m.steps.len() {
            if self.started[i]
                || !self.m.steps[i]
                    .deps
                    .iter()
                    .all(|&d| self.results[d].is_some())
            {
                continue;
            }
            let s = &self.m.steps[i];
            let object = match &s.target {
                Target::This => Ok(self.self_id.clone()),
                Target::Arg(a) => match self.args.get(a) {
                    Some(Value::String(id)) => Ok(id.clone()),
                    _ => Err(format!(
                        "step {}: argument {a:?} must be an object id",
                        s.id
                    )),
                },
                Target::Step(t) => self.result_of(t).and_then(|r| {
                    r.created
                        .clone()
                        .ok_or_else(|| format!("step {t} created no object"))
                }),
            };
            let args = self.resolve(&Value::Object(s.args.clone()));
            match (object, args) {
                (Ok(object), Ok(args)) => {
                    self.started[i] = true;
                    out.push(StepCall {
                        index: i,
                        step: s.id.clone(),
                        object,
                        function: s.function.clone(),
                        args,
                        output_id: self.m.immutable.then(|| Self::output_id(&self.inv, &s.id)),
                    });
                }
                (Err(e), _) | (_, Err(e)) => {
                    self.error = Some(format!("step {}: {e}", s.id));
                    return Vec::new();
                }
            }
        }
        out
    }

    pub fn done(&mut self, index: usize, r: StepResult) {
        if index < self.results.len() {
            self.results[index] = Some(r);
        }
    }

    pub fn failed(&mut self, index: usize, e: &str) {
        if self.error.is_none() {
            let step = self.m.steps.get(index).map_or("?", |s| s.id.as_str());
            self.error = Some(format!("step {step} failed: {e}"));
        }
    }

    /// `Some` once every step finished (or one failed): the output of the
    /// result step with the ids of the objects created along the way.
    pub fn finished(&self) -> Option<Result<Value, String>> {
        if let Some(e) = &self.error {
            return Some(Err(e.clone()));
        }
        if self.results.iter().any(Option::is_none) {
            return None;
        }
        let last = self
            .m
            .result
            .as_deref()
            .and_then(|r| self.m.steps.iter().position(|s| s.id == r))
            .unwrap_or(self.m.steps.len() - 1);
        let mut created = Map::new();
        for (s, r) in self.m.steps.iter().zip(&self.results) {
            if let Some(StepResult {
                created: Some(id), ..
            }) = r
            {
                created.insert(s.id.clone(), Value::String(id.clone()));
            }
        }
        let r = self.results[last].as_ref()?;
        Some(Ok(serde_json::json!({
            "output": r.output,
            "id": r.created,
            "created": created,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::super::package::{parse_package, Body};
    use super::*;
    use serde_json::json;

    fn pkg(steps: &str) -> Result<Macro, Vec<String>> {
        let text = format!(
            "name: p\nclasses:\n  - name: V\n    functions:\n      - name: thumb\n        image: x\n        output: V\n      - name: meta\n        image: x\n      - name: run\n        type: MACRO\n        immutable: true\n        steps:\n{steps}"
        );
        match parse_package("p.yaml", &text) {
            Ok(p) => match &p.class("V").unwrap().functions["run"].body {
                Body::Macro(m) => Ok(m.clone()),
                _ => panic!("not a macro"),
            },
            Err(e) => Err(e.iter().map(|e| e.to_string()).collect()),
        }
    }

    const DIAMOND: &str = "          - {id: a, function: thumb}\n          - {id: b, function: meta}\n          - {id: c, function: meta, target: a, args: {x: '${b.output}', who: '${self.id}'}}\n          - {id: d, function: thumb, target: a, args: {n: '${args.n}'}}\n";

    #[test]
    fn waves_follow_dependencies() {
        let m = pkg(DIAMOND).unwrap();
        assert_eq!(m.waves, vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(m.steps[2].deps, vec![0, 1]);
        assert_eq!(m.steps[2].target, Target::Step("a".into()));
    }

    #[test]
    fn cycles_and_bad_references_are_refused_with_lines() {
        let e = pkg("          - {id: a, function: meta, args: {x: '${c.output}'}}\n          - {id: b, function: meta, args: {x: '${a.output}'}}\n          - {id: c, function: meta, args: {x: '${b.output}'}}\n").unwrap_err();
        assert!(
            e.iter()
                .any(|m| m.contains("cycle") && m.contains("p.yaml:14:")),
            "{e:?}"
        );
        let e =
            pkg("          - {id: a, function: meta, args: {x: '${zz.output}'}}\n").unwrap_err();
        assert!(e.iter().any(|m| m.contains("no step \"zz\"")), "{e:?}");
        let e =
            pkg("          - {id: a, function: meta, args: {x: 'pre ${self.id}'}}\n").unwrap_err();
        assert!(e.iter().any(|m| m.contains("whole string")), "{e:?}");
        let e = pkg("          - {id: a, function: nope}\n").unwrap_err();
        assert!(
            e.iter().any(|m| m.contains("has no function \"nope\"")),
            "{e:?}"
        );
        let e = pkg(
            "          - {id: a, function: meta}\n          - {id: b, function: meta, target: a}\n",
        )
        .unwrap_err();
        assert!(e.iter().any(|m| m.contains("creates no object")), "{e:?}");
        let e = pkg("          - {id: a, function: meta, args: {x: '${a.output}'}}\n").unwrap_err();
        assert!(e.iter().any(|m| m.contains("refers to itself")), "{e:?}");
    }

    #[test]
    fn run_hands_out_ready_steps_in_parallel() {
        let m = pkg(DIAMOND).unwrap();
        let mut r = MacroRun::new(m.clone(), "obj1", json!({"n": 7}), "inv-1");
        let first = r.ready();
        assert_eq!(
            first.iter().map(|c| c.step.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(r.ready().is_empty(), "steps handed out twice");
        let oid = first[0].output_id.clone().unwrap();
        assert_eq!(oid, MacroRun::output_id("inv-1", "a"));
        assert_ne!(oid, MacroRun::output_id("inv-2", "a"));
        r.done(
            0,
            StepResult {
                created: Some(oid.clone()),
                output: json!({"w": 1}),
            },
        );
        // d needs only a; c needs b as well.
        let second = r.ready();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].step, "d");
        assert_eq!(second[0].object, oid);
        assert_eq!(second[0].args, json!({"n": 7}));
        r.done(
            1,
            StepResult {
                created: None,
                output: json!("meta!"),
            },
        );
        let third = r.ready();
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].step, "c");
        let second = [third[0].clone(), second[0].clone()];
        assert_eq!(second[0].object, oid);
        assert_eq!(second[0].args, json!({"x": "meta!", "who": "obj1"}));
        assert!(r.finished().is_none());
        r.done(
            2,
            StepResult {
                created: None,
                output: json!(1),
            },
        );
        r.done(
            3,
            StepResult {
                created: Some("o4".into()),
                output: json!({"fin": true}),
            },
        );
        let out = r.finished().unwrap().unwrap();
        assert_eq!(out["output"], json!({"fin": true}));
        assert_eq!(out["id"], "o4");
        assert_eq!(out["created"]["a"], oid.as_str());
    }

    #[test]
    fn a_failed_step_fails_the_run() {
        let m = pkg(DIAMOND).unwrap();
        let mut r = MacroRun::new(m, "o", json!({}), "i");
        let calls = r.ready();
        r.failed(calls[1].index, "boom");
        assert!(r.ready().is_empty());
        let e = r.finished().unwrap().unwrap_err();
        assert!(e.contains("step b failed: boom"), "{e}");
    }
}
