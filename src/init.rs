//! `crucible init`: a commented starter hosts.toml and, on request, the deploy workflow.

use std::path::Path;

use crate::error::Error;

/// The starter hosts.toml that `crucible init` writes.
const STARTER_HOSTS: &str = include_str!("starter-hosts.toml");

/// The deploy workflow that `crucible init --workflow` writes; the same file this repository ships.
const DEPLOY_WORKFLOW: &str = include_str!("../.github/workflows/deploy.yml");

/// Writes a starter hosts.toml (and the deploy workflow with `workflow`) without overwriting.
pub fn init(config_path: &Path, workflow: bool) -> Result<(), Error> {
    let mut targets = vec![(config_path.to_path_buf(), STARTER_HOSTS)];
    if workflow {
        let base = config_path.parent().unwrap_or(Path::new("."));
        targets.push((base.join(".github/workflows/deploy.yml"), DEPLOY_WORKFLOW));
    }
    let (existing, missing): (Vec<_>, Vec<_>) =
        targets.into_iter().partition(|(path, _)| path.exists());
    for (path, _) in &existing {
        eprintln!("{} already exists; left unchanged", path.display());
    }
    if missing.is_empty() {
        return Err(Error::Usage(format!(
            "nothing written: {} already exists, and crucible init never overwrites; move it away first",
            existing
                .iter()
                .map(|(path, _)| path.display().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        )));
    }
    for (path, text) in missing {
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|source| Error::WriteFile {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(&path, text).map_err(|source| Error::WriteFile {
            path: path.clone(),
            source,
        })?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
