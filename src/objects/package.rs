//! Packages: classes with inheritance, state specs (structured fields and
//! named blobs, each with an access modifier) and functions (built-in,
//! TASK in a container, MACRO dataflow). [`parse_package`] validates a whole
//! package before anything is registered; every error names the file, the
//! line and the field. The result is a resolved [`Package`]: each class
//! carries its inherited fields, blobs and functions, overrides applied.

use super::dataflow;
use super::yaml;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Most classes in one package, functions in one class, fields in one
/// state spec: packages are small programs, not data.
pub const MAX_CLASSES: usize = 64;
pub const MAX_FUNCTIONS: usize = 64;
pub const MAX_FIELDS: usize = 128;
/// Longest TASK timeout.
pub const MAX_TIMEOUT_S: u32 = 300;
/// The built-in functions every class has.
pub const BUILTINS: [&str; 4] = ["new", "get", "update", "delete"];

/// Who may see a field or blob, or call a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub enum Access {
    /// Anyone, clients included.
    #[default]
    #[serde(rename = "PUBLIC", alias = "public")]
    Public,
    /// Functions of the same package.
    #[serde(rename = "INTERNAL", alias = "internal")]
    Internal,
    /// The class's own functions (and those of its subclasses).
    #[serde(rename = "PRIVATE", alias = "private")]
    Private,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Public => "PUBLIC",
            Access::Internal => "INTERNAL",
            Access::Private => "PRIVATE",
        })
    }
}

/// Who is calling: a client, or a function of some package's class (a
/// MACRO step).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Caller {
    External,
    Function { pkg: String, class: String },
}

/// Where objects of a class are placed on the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Locality {
    /// Object ids are random: objects spread evenly over the nodes.
    #[default]
    Spread,
    /// Object ids are chosen so that their keys share the class key's
    /// first bits: objects of one class land on the same few nodes.
    Class,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    #[default]
    Any,
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
}

impl FieldType {
    pub fn admits(self, v: &Value) -> bool {
        match self {
            FieldType::Any => true,
            FieldType::String => v.is_string(),
            FieldType::Number => v.is_number(),
            FieldType::Integer => v.is_i64() || v.is_u64(),
            FieldType::Boolean => v.is_boolean(),
            FieldType::Object => v.is_object(),
            FieldType::Array => v.is_array(),
        }
    }
    fn name(self) -> &'static str {
        match self {
            FieldType::Any => "any",
            FieldType::String => "string",
            FieldType::Number => "number",
            FieldType::Integer => "integer",
            FieldType::Boolean => "boolean",
            FieldType::Object => "object",
            FieldType::Array => "array",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum RawKind {
    #[serde(alias = "builtin")]
    Builtin,
    #[serde(alias = "task")]
    Task,
    #[serde(alias = "macro")]
    Macro,
}

// ---- the text as written ----------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPackage {
    name: String,
    /// Accepted for the package's reader; capy keeps the source with it.
    #[serde(default, rename = "description")]
    _description: Option<String>,
    classes: Vec<RawClass>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    name: String,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    locality: Locality,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    functions: Vec<RawFunction>,
    /// Lua source of the class's handler (see `node::obj_handlers`).
    #[serde(default)]
    handler: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    #[serde(default)]
    fields: Vec<RawField>,
    #[serde(default, alias = "keySpecs")]
    blobs: Vec<RawBlob>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: String,
    #[serde(rename = "type", default)]
    ty: FieldType,
    #[serde(default)]
    access: Access,
    #[serde(default)]
    default: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlob {
    name: String,
    #[serde(default)]
    access: Access,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    name: String,
    #[serde(rename = "type", default)]
    kind: Option<RawKind>,
    #[serde(default)]
    access: Access,
    /// Output class: the call creates an object of it from the output.
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    config: Option<Value>,
    #[serde(default)]
    timeout: Option<u32>,
    #[serde(default)]
    memory: Option<u32>,
    #[serde(default)]
    steps: Option<Vec<dataflow::RawStep>>,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    immutable: bool,
}

// ---- the resolved package -----------------------------------------------

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub classes: BTreeMap<String, Class>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Class {
    pub name: String,
    pub parent: Option<String>,
    /// Parent, grandparent, ...
    pub ancestors: Vec<String>,
    pub locality: Locality,
    pub fields: BTreeMap<String, Field>,
    pub blobs: BTreeMap<String, BlobSpec>,
    /// Own, inherited and built-in functions, overrides applied.
    pub functions: BTreeMap<String, Function>,
    pub handler: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Field {
    pub ty: FieldType,
    pub access: Access,
    pub default: Option<Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlobSpec {
    pub access: Access,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Function {
    pub name: String,
    /// The class whose definition this is (an ancestor when inherited).
    pub defined_in: String,
    pub access: Access,
    pub output: Option<String>,
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Body {
    Builtin,
    Task(Task),
    Macro(dataflow::Macro),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Image reference or archive path as written in the package.
    pub image: String,
    /// Static input fields merged under the call's arguments.
    pub config: Map<String, Value>,
    pub timeout_s: u32,
    pub memory_mib: u32,
}

/// One validation error: where and what.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PkgError {
    pub file: String,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for PkgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}: {}", self.file, l, self.field, self.message),
            None => write!(f, "{}: {}: {}", self.file, self.field, self.message),
        }
    }
}

/// Collects errors with positions while checking.
pub(crate) struct Errors<'a> {
    file: &'a str,
    marked: &'a yaml::Marked,
    pub(crate) list: Vec<PkgError>,
}

impl Errors<'_> {
    pub(crate) fn add(&mut self, field: &str, message: impl Into<String>) {
        if self.list.len() < 100 {
            self.list.push(PkgError {
                file: self.file.to_string(),
                line: self.marked.line_of(field),
                field: field.to_string(),
                message: message.into(),
            });
        }
    }
}

/// The name a class's handler runs under (its counters, its log lines).
pub fn runtime_name(pkg: &str, class: &str) -> String {
    format!("{pkg}.{class}")
}

/// Loads a class's Lua handler in the handlers layer's sandbox, with the
/// default limits: at deploy to check it, on a root to run it.
pub fn load_handler(
    pkg: &str,
    class: &str,
    source: &str,
) -> Result<crate::handlers::AppRuntime, String> {
    let name = runtime_name(pkg, class);
    crate::handlers::AppRuntime::new(
        &name,
        &crate::handlers::HandlerSource::Lua {
            name: format!("{name} handler"),
            code: source.to_string(),
        },
        crate::handlers::Limits::default(),
    )
    .map_err(|e| e.to_string())
}

/// An identifier: a letter, then letters, digits or `_`, at most 64.
pub fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic())
        && s.len() <= 64
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A package name: 1 to 40 of letters, digits, `-` and `_`.
pub fn is_package_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Parses and validates a package; `file` names it in errors.
pub fn parse_package(file: &str, text: &str) -> Result<Package, Vec<PkgError>> {
    let marked = yaml::parse(text).map_err(|e| {
        vec![PkgError {
            file: file.to_string(),
            line: Some(e.line),
            field: "(syntax)".into(),
            message: e.message,
        }]
    })?;
    let raw: RawPackage = serde_path_to_error::deserialize(&marked.value).map_err(|e| {
        let field = e.path().to_string();
        let message = e.inner().to_string();
        vec![PkgError {
            file: file.to_string(),
            line: marked.line_of(&field),
            field,
            message,
        }]
    })?;
    let mut errs = Errors {
        file,
        marked: &marked,
        list: Vec::new(),
    };
    let pkg = resolve(raw, &mut errs);
    if errs.list.is_empty() {
        Ok(pkg)
    } else {
        Err(errs.list)
    }
}

fn resolve(raw: RawPackage, errs: &mut Errors) -> Package {
    if !is_package_name(&raw.name) {
        errs.add(
            "name",
            "a package name is 1 to 40 letters, digits, '-' or '_'",
        );
    }
    if raw.classes.is_empty() {
        errs.add("classes", "a package needs at least one class");
    }
    if raw.classes.len() > MAX_CLASSES {
        errs.add("classes", format!("at most {MAX_CLASSES} classes"));
    }
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, c) in raw.classes.iter().enumerate() {
        let at = format!("classes[{i}].name");
        if !is_ident(&c.name) {
            errs.add(
                &at,
                format!(
                    "{:?} is not a class name (a letter, then letters, digits or '_')",
                    c.name
                ),
            );
        }
        if index.insert(&c.name, i).is_some() {
            errs.add(&at, format!("class {:?} is defined twice", c.name));
        }
    }
    // Ancestors, refusing unknown parents and cycles.
    let mut ancestors: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (i, c) in raw.classes.iter().enumerate() {
        let mut chain = Vec::new();
        let mut cur = c.parent.as_deref();
        while let Some(p) = cur {
            if p == c.name || chain.iter().any(|a: &String| a == p) {
                errs.add(
                    &format!("classes[{i}].parent"),
                    format!("class {:?} inherits from itself (through {p:?})", c.name),
                );
                break;
            }
            let Some(&pi) = index.get(p) else {
                errs.add(
                    &format!("classes[{i}].parent"),
                    format!("no class {p:?} in this package"),
                );
                break;
            };
            chain.push(p.to_string());
            cur = raw.classes[pi].parent.as_deref();
        }
        ancestors.insert(&c.name, chain);
    }
    // Fields and blobs, root class first so children see them.
    let mut classes: BTreeMap<String, Class> = BTreeMap::new();
    let mut order: Vec<usize> = (0..raw.classes.len()).collect();
    order.sort_by_key(|&i| {
        ancestors
            .get(raw.classes[i].name.as_str())
            .map_or(0, Vec::len)
    });
    for &i in &order {
        let c = &raw.classes[i];
        let anc = ancestors.get(c.name.as_str()).cloned().unwrap_or_default();
        let inherited = c.parent.as_ref().and_then(|p| classes.get(p));
        // A class without a handler of its own runs its parent's.
        let handler = c
            .handler
            .clone()
            .or_else(|| inherited.and_then(|p| p.handler.clone()));
        let mut fields = inherited.map(|p| p.fields.clone()).unwrap_or_default();
        let mut blobs = inherited.map(|p| p.blobs.clone()).unwrap_or_default();
        let mut functions = inherited
            .map(|p| p.functions.clone())
            .unwrap_or_else(builtins);
        let base = format!("classes[{i}]");
        if c.state.fields.len() + c.state.blobs.len() > MAX_FIELDS {
            errs.add(
                &format!("{base}.state"),
                format!("at most {MAX_FIELDS} fields and blobs"),
            );
        }
        for (j, f) in c.state.fields.iter().enumerate() {
            let at = format!("{base}.state.fields[{j}]");
            if !is_ident(&f.name) {
                errs.add(
                    &format!("{at}.name"),
                    format!("{:?} is not a field name", f.name),
                );
            }
            if fields.contains_key(&f.name) || blobs.contains_key(&f.name) {
                errs.add(
                    &format!("{at}.name"),
                    format!(
                        "{:?} is already defined (here or in a parent class)",
                        f.name
                    ),
                );
            }
            if let Some(d) = &f.default {
                if !f.ty.admits(d) {
                    errs.add(
                        &format!("{at}.default"),
                        format!("the default is not of type {}", f.ty.name()),
                    );
                }
            }
            fields.insert(
                f.name.clone(),
                Field {
                    ty: f.ty,
                    access: f.access,
                    default: f.default.clone(),
                },
            );
        }
        for (j, b) in c.state.blobs.iter().enumerate() {
            let at = format!("{base}.state.blobs[{j}].name");
            if !is_ident(&b.name) {
                errs.add(&at, format!("{:?} is not a blob name", b.name));
            }
            if fields.contains_key(&b.name) || blobs.contains_key(&b.name) {
                errs.add(
                    &at,
                    format!(
                        "{:?} is already defined (here or in a parent class)",
                        b.name
                    ),
                );
            }
            blobs.insert(b.name.clone(), BlobSpec { access: b.access });
        }
        if let Some(src) = &c.handler {
            match load_handler(&raw.name, &c.name, src) {
                Err(e) => errs.add(&format!("{base}.handler"), e),
                Ok(rt) if rt.defines(crate::handlers::EventKind::Timer) => errs.add(
                    &format!("{base}.handler"),
                    "timerCb is not run for objects (their handlers act on create, read and \
                     update); app handlers have timers",
                ),
                Ok(_) => {}
            }
        }
        if c.functions.len() > MAX_FUNCTIONS {
            errs.add(
                &format!("{base}.functions"),
                format!("at most {MAX_FUNCTIONS} functions"),
            );
        }
        let mut own = BTreeSet::new();
        for (j, f) in c.functions.iter().enumerate() {
            let at = format!("{base}.functions[{j}]");
            if !is_ident(&f.name) {
                errs.add(
                    &format!("{at}.name"),
                    format!("{:?} is not a function name", f.name),
                );
            }
            if !own.insert(f.name.clone()) {
                errs.add(
                    &format!("{at}.name"),
                    format!(
                        "function {:?} is defined twice in class {:?}",
                        f.name, c.name
                    ),
                );
            }
            if let Some(func) = function(&c.name, f, &at, errs) {
                functions.insert(f.name.clone(), func);
            }
        }
        classes.insert(
            c.name.clone(),
            Class {
                name: c.name.clone(),
                parent: c.parent.clone(),
                ancestors: anc,
                locality: c.locality,
                fields,
                blobs,
                functions,
                handler,
            },
        );
    }
    // Checks that need every class: output classes and macro steps.
    for (i, c) in raw.classes.iter().enumerate() {
        for (j, f) in c.functions.iter().enumerate() {
            let at = format!("classes[{i}].functions[{j}]");
            if let Some(o) = &f.output {
                if !classes.contains_key(o) {
                    errs.add(
                        &format!("{at}.output"),
                        format!("no class {o:?} in this package"),
                    );
                }
            }
            if let Some(Function {
                body: Body::Macro(m),
                ..
            }) = classes.get(&c.name).and_then(|k| k.functions.get(&f.name))
            {
                dataflow::check_targets(m, &f.name, &c.name, &classes, &at, errs);
            }
        }
    }
    Package {
        name: raw.name,
        classes,
    }
}

fn builtins() -> BTreeMap<String, Function> {
    BUILTINS
        .iter()
        .map(|n| {
            (
                n.to_string(),
                Function {
                    name: n.to_string(),
                    defined_in: String::new(),
                    access: Access::Public,
                    output: None,
                    body: Body::Builtin,
                },
            )
        })
        .collect()
}

fn function(class: &str, f: &RawFunction, at: &str, errs: &mut Errors) -> Option<Function> {
    let builtin = BUILTINS.contains(&f.name.as_str());
    let kind = f.kind.unwrap_or(if builtin {
        RawKind::Builtin
    } else if f.steps.is_some() {
        RawKind::Macro
    } else {
        RawKind::Task
    });
    let kind_at = format!("{at}.type");
    let mut ok = true;
    let mut unexpected = |what: &str, present: bool, errs: &mut Errors| {
        if present {
            errs.add(
                &format!("{at}.{what}"),
                format!("not allowed for a {kind:?} function"),
            );
            ok = false;
        }
    };
    let body = match kind {
        RawKind::Builtin => {
            if !builtin {
                errs.add(
                    &kind_at,
                    format!(
                        "only {BUILTINS:?} are built-in; {:?} needs type TASK or MACRO",
                        f.name
                    ),
                );
                return None;
            }
            unexpected("image", f.image.is_some(), errs);
            unexpected("steps", f.steps.is_some(), errs);
            unexpected("output", f.output.is_some(), errs);
            Body::Builtin
        }
        _ if builtin => {
            errs.add(
                &kind_at,
                format!(
                    "{:?} is a built-in function: only its access can be set",
                    f.name
                ),
            );
            return None;
        }
        RawKind::Task => {
            unexpected("steps", f.steps.is_some(), errs);
            unexpected("result", f.result.is_some(), errs);
            let image = match &f.image {
                Some(i) if !i.is_empty() && i.len() <= 255 && !i.chars().any(char::is_control) => {
                    i.clone()
                }
                _ => {
                    errs.add(&format!("{at}.image"), "a TASK function needs an image (an archive file next to the package, or an image reference), at most 255 characters");
                    String::new()
                }
            };
            let config = match &f.config {
                None => Map::new(),
                Some(Value::Object(m)) => m.clone(),
                Some(_) => {
                    errs.add(&format!("{at}.config"), "config must be a map");
                    Map::new()
                }
            };
            let timeout_s = f.timeout.unwrap_or(60);
            if timeout_s == 0 || timeout_s > MAX_TIMEOUT_S {
                errs.add(
                    &format!("{at}.timeout"),
                    format!("timeout must be 1 to {MAX_TIMEOUT_S} seconds"),
                );
            }
            let memory_mib = f.memory.unwrap_or(128);
            if !(6..=65536).contains(&memory_mib) {
                errs.add(&format!("{at}.memory"), "memory must be 6 to 65536 MiB");
            }
            Body::Task(Task {
                image,
                config,
                timeout_s,
                memory_mib,
            })
        }
        RawKind::Macro => {
            unexpected("image", f.image.is_some(), errs);
            unexpected("config", f.config.is_some(), errs);
            let Some(steps) = &f.steps else {
                errs.add(&format!("{at}.steps"), "a MACRO function needs steps");
                return None;
            };
            let m = dataflow::build(steps, f.result.as_deref(), f.immutable, at, errs)?;
            Body::Macro(m)
        }
    };
    if !ok {
        return None;
    }
    Some(Function {
        name: f.name.clone(),
        defined_in: class.to_string(),
        access: f.access,
        output: f.output.clone(),
        body,
    })
}

// ---- using a resolved class ---------------------------------------------

/// What a caller may see of a class's members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Public,
    Internal,
    Private,
}

impl Level {
    pub fn admits(self, a: Access) -> bool {
        match a {
            Access::Public => true,
            Access::Internal => self >= Level::Internal,
            Access::Private => self == Level::Private,
        }
    }
}

/// Why a call or an update is refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
}

impl Package {
    pub fn class(&self, name: &str) -> Option<&Class> {
        self.classes.get(name)
    }

    /// Two classes are related when one inherits from the other.
    pub fn related(&self, a: &str, b: &str) -> bool {
        a == b
            || self
                .class(a)
                .is_some_and(|c| c.ancestors.iter().any(|x| x == b))
            || self
                .class(b)
                .is_some_and(|c| c.ancestors.iter().any(|x| x == a))
    }

    /// What `caller` may see and call on objects of `class`.
    pub fn level(&self, class: &str, caller: &Caller) -> Level {
        match caller {
            Caller::External => Level::Public,
            Caller::Function { pkg, class: from } if *pkg == self.name => {
                if self.related(class, from) {
                    Level::Private
                } else {
                    Level::Internal
                }
            }
            Caller::Function { .. } => Level::Public,
        }
    }
}

impl Class {
    /// The function `name` if `level` may call it.
    pub fn callable(&self, name: &str, level: Level) -> Result<&Function, Refusal> {
        let f = self.functions.get(name).ok_or_else(|| {
            Refusal::NotFound(format!("class {} has no function {name:?}", self.name))
        })?;
        if !level.admits(f.access) {
            return Err(Refusal::Forbidden(format!(
                "function {name} of class {} is {}: {}",
                self.name,
                f.access,
                match f.access {
                    Access::Internal => "only functions of its package may call it",
                    _ => "only the class's own functions may call it",
                }
            )));
        }
        Ok(f)
    }

    /// The state of a new object: defaults, then `given` (checked).
    pub fn initial_state(
        &self,
        given: Option<&Value>,
        level: Level,
    ) -> Result<Map<String, Value>, Refusal> {
        let mut state = Map::new();
        for (n, f) in &self.fields {
            if let Some(d) = &f.default {
                state.insert(n.clone(), d.clone());
            }
        }
        if let Some(g) = given {
            let patch = g.as_object().ok_or_else(|| {
                Refusal::Invalid("the initial state must be a JSON object".into())
            })?;
            self.check_patch(patch, level)?;
            for (k, v) in patch {
                state.insert(k.clone(), v.clone());
            }
        }
        Ok(state)
    }

    /// Refuses unknown fields, wrong types and fields `level` may not write.
    pub fn check_patch(&self, patch: &Map<String, Value>, level: Level) -> Result<(), Refusal> {
        for (k, v) in patch {
            let Some(f) = self.fields.get(k) else {
                return Err(Refusal::Invalid(format!(
                    "class {} has no field {k:?}",
                    self.name
                )));
            };
            if !level.admits(f.access) {
                return Err(Refusal::Forbidden(format!(
                    "field {k} of class {} is {}",
                    self.name, f.access
                )));
            }
            if !v.is_null() && !f.ty.admits(v) {
                return Err(Refusal::Invalid(format!(
                    "field {k} of class {} must be of type {}",
                    self.name,
                    f.ty.name()
                )));
            }
        }
        Ok(())
    }

    /// Checks a whole new state a function returned (the class's own code
    /// may write every field).
    pub fn check_state(&self, state: &Value) -> Result<Map<String, Value>, Refusal> {
        let m = state.as_object().ok_or_else(|| {
            Refusal::Invalid("the function's new state is not a JSON object".into())
        })?;
        self.check_patch(m, Level::Private)?;
        Ok(m.clone())
    }

    /// The fields of `state` that `level` may see.
    pub fn visible(&self, state: &Map<String, Value>, level: Level) -> Map<String, Value> {
        state
            .iter()
            .filter(|(k, _)| self.fields.get(*k).is_some_and(|f| level.admits(f.access)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn blob(&self, name: &str, level: Level) -> Result<&BlobSpec, Refusal> {
        let b = self.blobs.get(name).ok_or_else(|| {
            Refusal::NotFound(format!("class {} has no blob {name:?}", self.name))
        })?;
        if !level.admits(b.access) {
            return Err(Refusal::Forbidden(format!(
                "blob {name} of class {} is {}",
                self.name, b.access
            )));
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIDEO: &str = r#"
name: media
classes:
  - name: Video
    state:
      fields:
        - {name: title, type: string, default: ""}
        - {name: views, type: integer, default: 0}
        - {name: secret, type: string, access: PRIVATE}
        - {name: codec, type: string, access: INTERNAL}
      blobs:
        - {name: video}
        - {name: raw, access: PRIVATE}
    functions:
      - name: transcode
        type: TASK
        image: fn.tar
        config: {action: incr, field: views}
      - name: audit
        image: fn.tar
        access: INTERNAL
      - name: delete
        access: PRIVATE
  - name: HdVideo
    parent: Video
    state:
      fields:
        - {name: height, type: integer, default: 1080}
    functions:
      - name: transcode
        image: hd.tar
        output: Video
"#;

    #[test]
    fn inheritance_and_overriding() {
        let p = parse_package("media.yaml", VIDEO).unwrap();
        let v = p.class("Video").unwrap();
        let hd = p.class("HdVideo").unwrap();
        assert_eq!(hd.ancestors, vec!["Video".to_string()]);
        assert!(hd.fields.contains_key("title") && hd.fields.contains_key("height"));
        assert!(hd.blobs.contains_key("video"));
        let t = &hd.functions["transcode"];
        assert_eq!(t.defined_in, "HdVideo");
        assert!(matches!(&t.body, Body::Task(t) if t.image == "hd.tar"));
        assert!(matches!(&v.functions["transcode"].body, Body::Task(t) if t.image == "fn.tar"));
        assert_eq!(hd.functions["audit"].defined_in, "Video");
        for b in BUILTINS {
            assert!(hd.functions.contains_key(b), "{b}");
        }
        assert_eq!(v.functions["delete"].access, Access::Private);
        assert_eq!(v.functions["get"].access, Access::Public);
    }

    #[test]
    fn access_levels() {
        let p = parse_package("media.yaml", VIDEO).unwrap();
        let v = p.class("Video").unwrap();
        let ext = p.level("Video", &Caller::External);
        assert_eq!(ext, Level::Public);
        assert!(v.callable("transcode", ext).is_ok());
        let e = v.callable("audit", ext).unwrap_err();
        assert!(
            matches!(&e, Refusal::Forbidden(m) if m.contains("INTERNAL")),
            "{e:?}"
        );
        assert!(matches!(
            v.callable("delete", ext),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(v.callable("nope", ext), Err(Refusal::NotFound(_))));
        let sibling = Caller::Function {
            pkg: "media".into(),
            class: "Other".into(),
        };
        let own = Caller::Function {
            pkg: "media".into(),
            class: "HdVideo".into(),
        };
        assert_eq!(p.level("Video", &sibling), Level::Internal);
        assert_eq!(p.level("Video", &own), Level::Private);
        let foreign = Caller::Function {
            pkg: "other".into(),
            class: "Video".into(),
        };
        assert_eq!(p.level("Video", &foreign), Level::Public);
        assert!(v.callable("audit", Level::Internal).is_ok());
        assert!(v.callable("delete", Level::Internal).is_err());
        assert!(v.callable("delete", Level::Private).is_ok());

        let mut st = v.initial_state(None, ext).unwrap();
        assert_eq!(st["views"], 0);
        st.insert("secret".into(), "s".into());
        st.insert("codec".into(), "h264".into());
        let vis = v.visible(&st, ext);
        assert!(
            vis.contains_key("title") && !vis.contains_key("secret") && !vis.contains_key("codec")
        );
        assert!(v.visible(&st, Level::Internal).contains_key("codec"));
        let patch = serde_json::json!({"secret": "x"});
        assert!(matches!(
            v.check_patch(patch.as_object().unwrap(), ext),
            Err(Refusal::Forbidden(_))
        ));
        let patch = serde_json::json!({"views": "many"});
        assert!(matches!(
            v.check_patch(patch.as_object().unwrap(), ext),
            Err(Refusal::Invalid(_))
        ));
        let patch = serde_json::json!({"nope": 1});
        assert!(matches!(
            v.check_patch(patch.as_object().unwrap(), ext),
            Err(Refusal::Invalid(_))
        ));
        assert!(v.blob("video", ext).is_ok());
        assert!(matches!(v.blob("raw", ext), Err(Refusal::Forbidden(_))));
    }

    fn errors(text: &str) -> Vec<PkgError> {
        parse_package("p.yaml", text).unwrap_err()
    }

    #[test]
    fn class_handlers_are_inherited_and_checked_at_deploy() {
        let text = "name: p\nclasses:\n  - name: A\n    handler: |\n      function readCb(c, a) return 1 end\n  - name: B\n    parent: A\n  - name: C\n    parent: A\n    handler: \"function updateCb(c, s) return s end\"\n";
        let p = parse_package("p.yaml", text).unwrap();
        let h = |c: &str| p.class(c).unwrap().handler.clone().unwrap_or_default();
        assert!(h("A").contains("readCb"));
        assert_eq!(h("B"), h("A"));
        assert!(h("C").contains("updateCb"));
        let e =
            errors("name: p\nclasses:\n  - name: A\n  - name: B\n    handler: \"function (\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].field, "classes[1].handler");
        assert_eq!(e[0].line, Some(5));
        let e = errors("name: p\nclasses:\n  - name: A\n    handler: \"while true do end\"\n");
        assert!(e[0].message.contains("instructions"), "{e:?}");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = errors("name: p\nclasses:\n  - name: A\n    functions:\n      - name: f\n        type: TASK\n        timeout: soon\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].field, "classes[0].functions[0].timeout");
        assert_eq!(e[0].line, Some(7));
        assert!(
            e[0].to_string()
                .starts_with("p.yaml:7: classes[0].functions[0].timeout: "),
            "{}",
            e[0]
        );

        let e = errors("name: p\nclasses:\n  - name: A\n    colour: red\n");
        assert!(e[0].message.contains("unknown field `colour`"), "{e:?}");
        assert_eq!(e[0].line, Some(4));

        let e = errors("name: p\nclasses:\n  - name: A\n    parent: Nope\n  - name: B\n    functions:\n      - name: f\n        type: TASK\n");
        let msgs: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("p.yaml:4: classes[0].parent: no class \"Nope\"")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("p.yaml:7: classes[1].functions[0].image: ")),
            "{msgs:?}"
        );

        let e =
            errors("name: p\nclasses:\n  - name: A\n    parent: B\n  - name: B\n    parent: A\n");
        assert!(
            e.iter().any(|e| e.message.contains("inherits from itself")),
            "{e:?}"
        );

        let e = errors("name: p\nclasses:\n  - name: A\n    state:\n      fields:\n        - {name: n, type: integer, default: x}\n");
        assert_eq!(e[0].field, "classes[0].state.fields[0].default");
        assert_eq!(e[0].line, Some(6));

        let e = errors("name: p\nclasses:\n  - name: A\n    functions:\n      - name: update\n        type: TASK\n        image: x\n");
        assert!(e[0].message.contains("built-in"), "{e:?}");

        let e = errors("name: p\nclasses:\n  - name: A\n    functions:\n      - name: f\n        image: x\n        output: Nope\n");
        assert_eq!(e[0].field, "classes[0].functions[0].output");

        let e = errors("name: p\nclasses:\n  - name: A\n    state:\n      fields:\n        - {name: a}\n  - name: B\n    parent: A\n    state:\n      fields:\n        - {name: a}\n");
        assert!(e[0].message.contains("already defined"), "{e:?}");
        assert_eq!(e[0].line, Some(11));

        let e = errors("name: p\nclasses:\n  - name: A\n    functions:\n      - name: f\n        access: SECRET\n        image: x\n");
        assert!(e[0].message.contains("unknown variant"), "{e:?}");
        assert_eq!(e[0].line, Some(6));

        let e = errors("name: p\nclasses: [\n");
        assert_eq!(e[0].field, "(syntax)");
        assert!(e[0].line.is_some());

        let e = errors("name: 'bad name'\nclasses:\n  - name: A\n");
        assert_eq!(e[0].field, "name");
    }

    #[test]
    fn json_packages_work() {
        let p = parse_package(
            "p.json",
            r#"{"name": "p", "classes": [{"name": "A", "state": {"fields": [{"name": "n", "type": "integer"}]}}]}"#,
        )
        .unwrap();
        assert_eq!(p.class("A").unwrap().fields["n"].ty, FieldType::Integer);
    }
}

#[cfg(test)]
mod example {
    #[test]
    fn the_example_package_is_valid() {
        let text = include_str!("../../examples/video.yaml");
        let p = super::parse_package("examples/video.yaml", text).unwrap_or_else(|e| {
            panic!(
                "{}",
                e.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert_eq!(
            p.class("HdVideo").unwrap().functions["transcode"].defined_in,
            "HdVideo"
        );
    }
}
