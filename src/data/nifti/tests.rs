//! NIfTI header parsing, decoding and output-header tests on synthetic files.

use super::write::output_header;
use super::*;

/// A minimal little- or big-endian header for a `dims` volume of `datatype`, plus data bytes.
fn synth(big: bool, dim: &[i16], datatype: i16, bitpix: i16, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; VOX_OFFSET_OUT];
    let mut f = FieldsMut { b: &mut b, big };
    f.i32(0, 348);
    f.i16(OFF_DIM, dim.len() as i16);
    for (i, &d) in dim.iter().enumerate() {
        f.i16(OFF_DIM + 2 * (i + 1), d);
    }
    f.i16(OFF_DATATYPE, datatype);
    f.i16(OFF_BITPIX, bitpix);
    for d in 0..4 {
        f.f32(OFF_PIXDIM + 4 * d, 1.0);
    }
    f.f32(OFF_VOX_OFFSET, 352.0);
    f.b[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(b"n+1\0");
    b.extend_from_slice(data);
    b
}

fn parse(bytes: &[u8]) -> Result<NiftiHeader> {
    NiftiHeader::parse(bytes, Path::new("t.nii"))
}

#[test]
fn decodes_both_byte_orders() {
    let vals: [i16; 4] = [-300, -1, 0, 32767];
    for big in [false, true] {
        let data: Vec<u8> = vals
            .iter()
            .flat_map(|v| {
                if big {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                }
            })
            .collect();
        let bytes = synth(big, &[2, 2, 1], 4, 16, &data);
        let h = parse(&bytes).unwrap();
        assert_eq!(h.is_big_endian(), big);
        assert_eq!(h.dims(), [2, 2, 1]);
        let out = decode(&bytes[352..], DType::I16, big, h.effective_scaling());
        assert_eq!(out, vec![-300.0, -1.0, 0.0, 32767.0]);
        let out = decode(&bytes[352..], DType::I16, big, Some((2.0, -3.0)));
        assert_eq!(out, vec![-603.0, -5.0, -3.0, 65531.0]);
    }
}

#[test]
fn scaling_rule() {
    let mut h = parse(&synth(false, &[1, 1, 1], 2, 8, &[0])).unwrap();
    for (s, i, want) in [
        (0.0, 5.0, None),
        (f32::NAN, 5.0, None),
        (f32::INFINITY, 0.0, None),
        (1.0, 0.0, None),
        (1.0, f32::NAN, None),
        (2.0, f32::NAN, Some((2.0, 0.0))),
        (1.0, -3.0, Some((1.0, -3.0))),
    ] {
        h.scl_slope = s;
        h.scl_inter = i;
        assert_eq!(h.effective_scaling(), want, "slope {s} inter {i}");
    }
}

#[test]
fn spacing_and_fallback_affine() {
    let mut h = parse(&synth(false, &[3, 4, 5], 2, 8, &[0; 60])).unwrap();
    h.pixdim = [1.0, -0.5, 0.0, f32::NAN, 1.0, 1.0, 1.0, 1.0];
    assert_eq!(h.spacing(), [0.5, 1.0, 1.0]);
    let a = h.affine();
    assert_eq!(a[0], [0.5, 0.0, 0.0, 0.0]);
    assert_eq!(a[1], [0.0, 1.0, 0.0, 0.0]);
    assert_eq!(a[3], [0.0, 0.0, 0.0, 1.0]);
}

#[test]
fn qform_identity_and_flip() {
    let mut h = parse(&synth(false, &[2, 2, 2], 2, 8, &[0; 8])).unwrap();
    h.qform_code = 1;
    h.pixdim[1..4].copy_from_slice(&[2.0, 3.0, 4.0]);
    h.qoffset = [1.0, 2.0, 3.0];
    let a = h.affine();
    assert_eq!(a[0], [2.0, 0.0, 0.0, 1.0]);
    assert_eq!(a[1], [0.0, 3.0, 0.0, 2.0]);
    assert_eq!(a[2], [0.0, 0.0, 4.0, 3.0]);
    // qfac = -1 flips k.
    h.pixdim[0] = -1.0;
    assert_eq!(h.affine()[2][2], -4.0);
    // b = 1: 180 degrees about x (a = 0 path).
    h.pixdim[0] = 1.0;
    h.quatern = [1.0, 0.0, 0.0];
    let a = h.affine();
    assert_eq!(a[0][0], 2.0);
    assert_eq!(a[1][1], -3.0);
    assert_eq!(a[2][2], -4.0);
    // sform wins when both are set.
    h.sform_code = 2;
    h.srow = [
        [1.0, 0.0, 0.0, 9.0],
        [0.0, 1.0, 0.0, 8.0],
        [0.0, 0.0, 1.0, 7.0],
    ];
    assert_eq!(h.affine()[0], [1.0, 0.0, 0.0, 9.0]);
}

#[test]
fn header_errors_name_the_field() {
    let good = synth(false, &[2, 2, 2], 2, 8, &[0; 8]);
    assert!(parse(&good).is_ok());
    let case = |patch: &dyn Fn(&mut Vec<u8>), field: &str| {
        let mut b = good.clone();
        patch(&mut b);
        let e = parse(&b).unwrap_err().to_string();
        assert!(e.contains(field), "{e:?} should name {field}");
        assert!(e.contains("t.nii"), "{e:?} should name the file");
    };
    case(&|b| b.truncate(200), "348-byte");
    case(&|b| b.truncate(356), "truncated");
    case(&|b| b.truncate(2), "sizeof_hdr");
    case(
        &|b| b[0..4].copy_from_slice(&540i32.to_le_bytes()),
        "NIfTI-2",
    );
    case(
        &|b| b[0..4].copy_from_slice(&7i32.to_le_bytes()),
        "sizeof_hdr",
    );
    case(
        &|b| b[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(b"ni1\0"),
        "ni1",
    );
    case(&|b| b[OFF_MAGIC] = b'x', "magic");
    case(&|b| b[OFF_DIM] = 0, "dim[0]");
    case(&|b| b[OFF_DIM] = 9, "dim[0]");
    case(&|b| b[OFF_DIM + 4] = 0, "dim[2]");
    case(&|b| b[OFF_DIM + 4] = 0xff, "truncated"); // dim[2] = 255: data too short
    case(
        &|b| {
            b[OFF_DIM] = 4;
            b[OFF_DIM + 8] = 3;
        },
        "more than one volume",
    );
    case(&|b| b[OFF_DATATYPE] = 32, "COMPLEX64");
    case(&|b| b[OFF_DATATYPE] = 128, "RGB24");
    case(&|b| b[OFF_DATATYPE] = 3, "datatype 3");
    for vo in [f32::NAN, 100.0, 352.5, -1.0] {
        case(
            &|b| b[OFF_VOX_OFFSET..OFF_VOX_OFFSET + 4].copy_from_slice(&vo.to_le_bytes()),
            "vox_offset",
        );
    }
    case(
        &|b| b[OFF_VOX_OFFSET..OFF_VOX_OFFSET + 4].copy_from_slice(&1e6f32.to_le_bytes()),
        "past the end",
    );
}

#[test]
fn four_d_singleton_and_two_d() {
    let h = parse(&synth(false, &[2, 3, 4, 1], 2, 8, &[0; 24])).unwrap();
    assert_eq!(h.dims(), [2, 3, 4]);
    let h = parse(&synth(false, &[2, 3], 2, 8, &[0; 6])).unwrap();
    assert_eq!(h.dims(), [2, 3, 1]);
    let h = parse(&synth(false, &[5], 2, 8, &[0; 5])).unwrap();
    assert_eq!(h.dims(), [5, 1, 1]);
}

#[test]
fn output_header_patches_only_the_data_description() {
    for big in [false, true] {
        let h = parse(&synth(big, &[2, 2, 2], 4, 16, &[0; 16])).unwrap();
        let out = output_header(&h, DT_FLOAT32, 32, "x");
        let o = parse(&[&out[..], &[0u8; 32]].concat()).unwrap();
        assert_eq!(o.is_big_endian(), big);
        assert_eq!(o.datatype(), DT_FLOAT32);
        assert_eq!(o.scaling(), (1.0, 0.0));
        assert_eq!(o.raw_dim(), h.raw_dim());
        assert_eq!(&out[OFF_DIM..OFF_DATATYPE], &h.raw.0[OFF_DIM..OFF_DATATYPE]);
        assert_eq!(
            &out[OFF_PIXDIM..OFF_VOX_OFFSET],
            &h.raw.0[OFF_PIXDIM..OFF_VOX_OFFSET]
        );
        assert_eq!(&out[348..352], &[0, 0, 0, 0]);
    }
}
