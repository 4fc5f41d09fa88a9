//! `capy pkg ...`, `capy obj ...` and `capy inv ...`: the object commands,
//! talking to a node's HTTP API.

use super::client::{print_reply, NodeArg};
use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::http::{percent_encode, Reply};
use clap::Subcommand;
use hyper::{Method, StatusCode};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// TASK functions may run for minutes.
const TIMEOUT: Duration = Duration::from_secs(330);

#[derive(Subcommand, Debug)]
pub enum PkgCmd {
    /// Validate a package (YAML or JSON) and register it.
    Deploy {
        file: PathBuf,
        #[command(flatten)]
        n: NodeArg,
    },
    /// List the registered packages.
    Ls {
        #[command(flatten)]
        n: NodeArg,
    },
    /// Show one package's classes and functions.
    Show {
        name: String,
        #[command(flatten)]
        n: NodeArg,
    },
    /// Unregister a package (its objects stay stored but cannot be called).
    Rm {
        name: String,
        #[command(flatten)]
        n: NodeArg,
    },
}

#[derive(Subcommand, Debug)]
pub enum ObjCmd {
    /// Create an object of PKG.CLASS with an optional initial state (JSON);
    /// prints its id.
    New {
        class: String,
        state: Option<String>,
        #[command(flatten)]
        n: NodeArg,
    },
    /// Print an object (the fields and blobs a client may see).
    Get {
        id: String,
        #[command(flatten)]
        n: NodeArg,
    },
    /// Call a function of an object with optional arguments (JSON).
    Invoke {
        id: String,
        function: String,
        args: Option<String>,
        /// Queue the call and print its invocation id.
        #[arg(long = "async")]
        asynchronous: bool,
        #[command(flatten)]
        n: NodeArg,
    },
    /// Store a blob of an object from FILE (`-` for stdin).
    PutBlob {
        id: String,
        blob: String,
        file: PathBuf,
        #[command(flatten)]
        n: NodeArg,
    },
    /// Print a blob of an object.
    GetBlob {
        id: String,
        blob: String,
        #[command(flatten)]
        n: NodeArg,
    },
    /// Delete an object.
    Rm {
        id: String,
        #[command(flatten)]
        n: NodeArg,
    },
}

fn request(url: &str, method: Method, body: Option<(Vec<u8>, &str)>) -> Result<Reply, i32> {
    super::client::request_within(url, method, body, TIMEOUT)
}

fn json_arg(s: Option<&str>, what: &str) -> Result<Vec<u8>, i32> {
    match s {
        None => Ok(Vec::new()),
        Some(t) => match serde_json::from_str::<serde_json::Value>(t) {
            Ok(_) => Ok(t.as_bytes().to_vec()),
            Err(e) => {
                eprintln!("capy: {what} is not JSON: {e}");
                Err(EXIT_USAGE)
            }
        },
    }
}

fn read_file(p: &Path, limit: u64) -> Result<Vec<u8>, i32> {
    super::client::read_limited(p, limit).map_err(|e| {
        eprintln!("capy: {e}");
        EXIT_USAGE
    })
}

/// Uploads every TASK image that names a file next to the package (the
/// node validates the package itself afterwards).
fn upload_images(file: &Path, text: &[u8], n: &NodeArg) -> Result<(), i32> {
    let Ok(text) = std::str::from_utf8(text) else {
        return Ok(());
    };
    let Ok(doc) = crate::objects::yaml::parse(text) else {
        return Ok(());
    };
    let Some(pkg) = doc.value["name"].as_str() else {
        return Ok(());
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut images: Vec<&str> = Vec::new();
    for c in doc.value["classes"].as_array().into_iter().flatten() {
        for f in c["functions"].as_array().into_iter().flatten() {
            if let Some(i) = f["image"].as_str() {
                if !images.contains(&i) {
                    images.push(i);
                }
            }
        }
    }
    for image in images {
        let path = dir.join(image);
        if !path.is_file() {
            continue;
        }
        let data = read_file(&path, crate::node::objects::MAX_IMAGE as u64)?;
        let url = format!(
            "{}/api/pkg/{}/images?name={}",
            n.base(),
            percent_encode(pkg),
            percent_encode(image)
        );
        let r = request(&url, Method::PUT, Some((data, "application/x-tar")))?;
        if !r.status.is_success() {
            eprintln!(
                "capy: uploading image {}: {} ({})",
                path.display(),
                r.message(),
                r.status
            );
            return Err(EXIT_FAILED);
        }
        eprintln!("uploaded image {} for package {pkg}", path.display());
    }
    Ok(())
}

pub fn pkg(c: PkgCmd) -> i32 {
    match c {
        PkgCmd::Deploy { file, n } => {
            let text = match read_file(&file, crate::objects::yaml::MAX_TEXT as u64) {
                Ok(t) => t,
                Err(code) => return code,
            };
            if let Err(code) = upload_images(&file, &text, &n) {
                return code;
            }
            let url = format!(
                "{}/api/pkg?file={}",
                n.base(),
                percent_encode(&file.display().to_string())
            );
            let r = request(&url, Method::POST, Some((text, "application/yaml")));
            // Validation errors come one per line.
            if let Ok(r) = &r {
                if r.status == StatusCode::BAD_REQUEST {
                    eprintln!("capy: {}", r.message());
                    return EXIT_USAGE;
                }
            }
            print_reply("pkg deploy", r)
        }
        PkgCmd::Ls { n } => print_reply(
            "pkg ls",
            request(&format!("{}/api/pkg", n.base()), Method::GET, None),
        ),
        PkgCmd::Show { name, n } => print_reply(
            "pkg show",
            request(
                &format!("{}/api/pkg/{}", n.base(), percent_encode(&name)),
                Method::GET,
                None,
            ),
        ),
        PkgCmd::Rm { name, n } => print_reply(
            "pkg rm",
            request(
                &format!("{}/api/pkg/{}", n.base(), percent_encode(&name)),
                Method::DELETE,
                None,
            ),
        ),
    }
}

pub fn obj(c: ObjCmd) -> i32 {
    match c {
        ObjCmd::New { class, state, n } => {
            let state: serde_json::Value =
                match state.as_deref().map(serde_json::from_str).transpose() {
                    Ok(s) => s.unwrap_or(serde_json::Value::Null),
                    Err(e) => {
                        eprintln!("capy: the state is not JSON: {e}");
                        return EXIT_USAGE;
                    }
                };
            let body = serde_json::json!({ "class": class, "state": state }).to_string();
            let r = request(
                &format!("{}/api/obj", n.base()),
                Method::POST,
                Some((body.into_bytes(), "application/json")),
            );
            match r {
                Ok(r) if r.status.is_success() => {
                    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
                    match v.get("id").and_then(|i| i.as_str()) {
                        Some(id) => {
                            println!("{id}");
                            EXIT_OK
                        }
                        None => print_reply("obj new", Ok(r)),
                    }
                }
                other => print_reply("obj new", other),
            }
        }
        ObjCmd::Get { id, n } => print_reply(
            "obj get",
            request(
                &format!("{}/api/obj/{}", n.base(), percent_encode(&id)),
                Method::GET,
                None,
            ),
        ),
        ObjCmd::Rm { id, n } => print_reply(
            "obj rm",
            request(
                &format!("{}/api/obj/{}", n.base(), percent_encode(&id)),
                Method::DELETE,
                None,
            ),
        ),
        ObjCmd::Invoke {
            id,
            function,
            args,
            asynchronous,
            n,
        } => {
            let body = match json_arg(args.as_deref(), "the arguments") {
                Ok(b) => b,
                Err(code) => return code,
            };
            let url = format!(
                "{}/api/obj/{}/{}{}",
                n.base(),
                percent_encode(&id),
                percent_encode(&function),
                if asynchronous { "?async=1" } else { "" }
            );
            print_reply(
                "obj invoke",
                request(&url, Method::POST, Some((body, "application/json"))),
            )
        }
        ObjCmd::PutBlob { id, blob, file, n } => {
            let data = match read_file(&file, crate::store::MAX_VALUE as u64) {
                Ok(d) => d,
                Err(code) => return code,
            };
            let url = format!(
                "{}/api/obj/{}/blobs/{}",
                n.base(),
                percent_encode(&id),
                percent_encode(&blob)
            );
            print_reply(
                "obj put-blob",
                request(&url, Method::PUT, Some((data, "application/octet-stream"))),
            )
        }
        ObjCmd::GetBlob { id, blob, n } => {
            let url = format!(
                "{}/api/obj/{}/blobs/{}",
                n.base(),
                percent_encode(&id),
                percent_encode(&blob)
            );
            match request(&url, Method::GET, None) {
                Ok(r) if r.status.is_success() => {
                    use std::io::Write;
                    let mut out = std::io::stdout();
                    match out.write_all(&r.body).and_then(|_| out.flush()) {
                        Ok(()) => EXIT_OK,
                        Err(e) => {
                            eprintln!("capy: writing stdout: {e}");
                            EXIT_FAILED
                        }
                    }
                }
                other => print_reply("obj get-blob", other),
            }
        }
    }
}

/// `capy inv ID`: where an async invocation stands.
pub fn inv(id: &str, n: &NodeArg) -> i32 {
    print_reply(
        "inv",
        request(
            &format!("{}/api/inv/{}", n.base(), percent_encode(id)),
            Method::GET,
            None,
        ),
    )
}
