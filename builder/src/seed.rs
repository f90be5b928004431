//! The NoCloud seed: a FAT12 volume labelled `CIDATA` holding `user-data` and `meta-data`,
//! written natively with fatfs (no mkfs/mtools). Deterministic: fixed timestamps (the build
//! epoch), volume id from the contents' hash, size from the contents.

use anyhow::{bail, Context, Result};
use fatfs::{
    Date, DateTime, FatType, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider,
};
use kiln_plan::Sha256;
use std::io::{Cursor, Write};

pub const LABEL: [u8; 11] = *b"CIDATA     ";
/// fatfs' floor for a FAT12 volume ("unfortunate disk size" below it).
const MIN_SECTORS: u32 = 11;
const FAT12_MAX_CLUSTERS: u64 = 4000;

#[derive(Debug)]
struct FixedTime(DateTime);

impl TimeProvider for FixedTime {
    fn get_current_date(&self) -> Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> DateTime {
        self.0
    }
}

/// FAT timestamps start in 1980 and have 2-second resolution.
fn fat_time(epoch: u64) -> DateTime {
    let epoch = epoch.max(315_532_800); // 1980-01-01T00:00:00Z
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u16;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u16;
    let year = (yoe + era * 400 + i64::from(month <= 2)).min(2107) as u16;
    DateTime {
        date: Date { year, month, day },
        time: Time {
            hour: (secs / 3600) as u16,
            min: (secs / 60 % 60) as u16,
            sec: (secs % 60) as u16 & !1,
            millis: 0,
        },
    }
}

fn cluster_size(sectors: u32) -> u32 {
    let mut bpc = 512u32;
    while u64::from(sectors) * 512 / u64::from(bpc) > FAT12_MAX_CLUSTERS && bpc < 32_768 {
        bpc *= 2;
    }
    bpc
}

fn try_build(
    sectors: u32,
    files: &[(&str, &[u8])],
    volume_id: u32,
    time: &'static FixedTime,
) -> Result<Vec<u8>> {
    let mut disk = Cursor::new(vec![0u8; sectors as usize * 512]);
    let opts = FormatVolumeOptions::new()
        .fat_type(FatType::Fat12)
        .total_sectors(sectors)
        .bytes_per_cluster(cluster_size(sectors))
        .max_root_dir_entries(16)
        .volume_id(volume_id)
        .volume_label(LABEL);
    fatfs::format_volume(&mut disk, opts).context("format")?;
    disk.set_position(0);
    {
        let fs =
            FileSystem::new(&mut disk, FsOptions::new().time_provider(time)).context("mount")?;
        {
            let root = fs.root_dir();
            for (name, data) in files {
                let mut f = root
                    .create_file(name)
                    .with_context(|| format!("create {name}"))?;
                f.truncate()?;
                f.write_all(data).with_context(|| format!("write {name}"))?;
                f.flush()?;
            }
        }
        fs.unmount().context("unmount")?;
    }
    Ok(disk.into_inner())
}

/// Builds `seed.img`, growing the volume until both files fit.
pub fn build(user_data: &[u8], meta_data: &[u8], epoch: u64) -> Result<Vec<u8>> {
    build_files(&[("meta-data", meta_data), ("user-data", user_data)], epoch)
}

/// A `CIDATA` volume holding `files` in the root directory (the bake seed also carries the
/// bundle tarball next to user-data and meta-data), grown until they fit. The volume id comes
/// from the contents, in order.
pub fn build_files(files: &[(&str, &[u8])], epoch: u64) -> Result<Vec<u8>> {
    let mut hash_input = Vec::new();
    for (_, data) in files.iter().rev() {
        hash_input.extend_from_slice(data);
    }
    let digest = Sha256::digest(&hash_input);
    let volume_id = u32::from_le_bytes(digest.as_bytes()[..4].try_into().expect("4 bytes"));
    // One leaked 16-byte value per build: fatfs wants a 'static time provider.
    let time: &'static FixedTime = Box::leak(Box::new(FixedTime(fat_time(epoch))));
    let data: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    let mut sectors =
        (MIN_SECTORS as u64).max(data.div_ceil(512) + data.div_ceil(512) / 64 + 12) as u32;
    let mut last_err = None;
    for _ in 0..40 {
        match try_build(sectors, files, volume_id, time) {
            Ok(img) => return Ok(img),
            Err(e) => last_err = Some(e),
        }
        sectors = sectors + sectors / 8 + 4;
        if u64::from(sectors) * 512 > 120 << 20 {
            break;
        }
    }
    match last_err {
        Some(e) => {
            Err(e.context("the payload does not fit a FAT12 CIDATA seed (at most ~120 MiB)"))
        }
        None => bail!("seed too large"),
    }
}

/// The `user-data` and `meta-data` of a seed volume.
pub fn read(img: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    Ok((read_file(img, "user-data")?, read_file(img, "meta-data")?))
}

/// One file from the root directory of a seed volume.
pub fn read_file(img: &[u8], name: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let fs =
        FileSystem::new(Cursor::new(img.to_vec()), FsOptions::new()).context("reading the seed")?;
    let mut out = Vec::new();
    fs.root_dir()
        .open_file(name)
        .with_context(|| format!("the seed has no {name}"))?
        .read_to_end(&mut out)
        .with_context(|| format!("reading {name} from the seed"))?;
    Ok(out)
}

/// The names of the files in the root directory of a seed volume, in directory order.
pub fn list(img: &[u8]) -> Result<Vec<String>> {
    let fs =
        FileSystem::new(Cursor::new(img.to_vec()), FsOptions::new()).context("reading the seed")?;
    let mut names = Vec::new();
    for e in fs.root_dir().iter() {
        let e = e.context("reading the seed's root directory")?;
        if e.is_file() {
            names.push(e.file_name());
        }
    }
    Ok(names)
}

/// A copy of the seed `img` whose meta-data carries instance id `id`; user-data and every other
/// file (a seed-delivered bundle) keep their exact bytes (a rebuilt VM: same payload, new
/// instance).
pub fn with_instance_id(img: &[u8], id: &str, epoch: u64) -> Result<Vec<u8>> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("instance id {id:?}: use letters, digits, '-', '_' and '.' only");
    }
    let meta_data = read_file(img, "meta-data")?;
    let text = String::from_utf8(meta_data).context("meta-data is not UTF-8")?;
    let mut found = false;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("instance-id:") {
                found = true;
                format!("instance-id: {id}")
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        bail!("the seed's meta-data has no instance-id line");
    }
    let mut meta = lines.join("\n");
    if text.ends_with('\n') {
        meta.push('\n');
    }
    let mut files = Vec::new();
    for name in list(img)? {
        let data = if name == "meta-data" {
            meta.clone().into_bytes()
        } else {
            read_file(img, &name)?
        };
        files.push((name, data));
    }
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    build_files(&refs, epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_time_converts_epochs() {
        let t = fat_time(1_735_689_600); // 2025-01-01T00:00:00Z
        assert_eq!((t.date.year, t.date.month, t.date.day), (2025, 1, 1));
        let t = fat_time(0);
        assert_eq!((t.date.year, t.date.month, t.date.day), (1980, 1, 1));
        let t = fat_time(951_825_599); // 2000-02-29T11:59:59Z
        assert_eq!(
            (
                t.date.year,
                t.date.month,
                t.date.day,
                t.time.hour,
                t.time.sec
            ),
            (2000, 2, 29, 11, 58)
        );
    }

    #[test]
    fn seed_is_readable_and_labelled() {
        let img = build(b"#cloud-config\n", b"instance-id: x\n", 0).unwrap();
        let fs = FileSystem::new(Cursor::new(img), FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        assert_eq!(fs.fat_type(), FatType::Fat12);
        let mut s = String::new();
        use std::io::Read;
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "#cloud-config\n");
    }

    #[test]
    fn a_new_instance_id_keeps_the_user_data_bytes() {
        let user_data = b"#cloud-config\nruncmd: [true]\n";
        let img = build(user_data, b"instance-id: kiln-abc\nlocal-hostname: n\n", 0).unwrap();
        let again = with_instance_id(&img, "rebuild-2", 0).unwrap();
        let (u, m) = read(&again).unwrap();
        assert_eq!(u, user_data);
        assert_eq!(m, b"instance-id: rebuild-2\nlocal-hostname: n\n");
        assert_eq!(read(&img).unwrap().0, u);
        assert!(with_instance_id(&img, "bad id", 0).is_err());
        let with_bundle = build_files(
            &[
                ("meta-data", b"instance-id: a\n"),
                ("user-data", user_data),
                ("bundle.tar.gz", b"bundle bytes"),
            ],
            0,
        )
        .unwrap();
        let again = with_instance_id(&with_bundle, "rebuild-3", 0).unwrap();
        assert_eq!(read_file(&again, "bundle.tar.gz").unwrap(), b"bundle bytes");
        assert_eq!(
            read_file(&again, "meta-data").unwrap(),
            b"instance-id: rebuild-3\n"
        );
        let no_id = build(user_data, b"local-hostname: n\n", 0).unwrap();
        assert!(with_instance_id(&no_id, "x", 0).is_err());
    }

    #[test]
    fn extra_files_fit_next_to_the_cloud_config() {
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let img = build_files(
            &[
                ("meta-data", b"instance-id: b\n"),
                ("user-data", b"#cloud-config\n"),
                ("bundle.tar.gz", &big),
            ],
            0,
        )
        .unwrap();
        let fs = FileSystem::new(Cursor::new(img), FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut got = Vec::new();
        use std::io::Read;
        fs.root_dir()
            .open_file("bundle.tar.gz")
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, big);
    }
}
