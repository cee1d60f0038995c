#!/usr/bin/env python
"""Rebuild the shipped example (examples/radiology/images + annotations) from files bundled in PyPI packages.

    python examples/radiology/make_example.py --skimage-data /tmp/skimg/x/skimage/data

Sources (licences in SOURCES.md): pydicom's test files (installed with pydicom) and scikit-image's data
files (`pip download --no-deps scikit-image -d /tmp/skimg`, unzip `skimage/data/*` from the wheel; scikit-image
is not a dependency). DICOM pixels are converted with the modality LUT (rescale slope/intercept) and an
explicit window, MONOCHROME2 only (the files used here). Deterministic: no randomness.
The annotation texts are written by hand for this example; they are plausible but NOT clinical ground truth.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"
ANNOTATIONS = HERE / "annotations"


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    low = center - width / 2.0
    return (np.clip((values - low) / width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _dicom(name: str) -> "object":
    import pydicom
    import pydicom.data

    return pydicom.dcmread(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", name))


def make_dicom_pngs() -> None:
    from pydicom.pixels import apply_modality_lut

    ct = _dicom("CT_small.dcm")
    hu = apply_modality_lut(ct.pixel_array, ct).astype(np.float64)   # Hounsfield units
    out = IMAGES / "ct"
    out.mkdir(parents=True, exist_ok=True)
    for label, (center, width) in {"soft_tissue": (40, 400), "bone": (400, 1800), "lung": (-600, 1500)}.items():
        Image.fromarray(_window(hu, center, width)).save(out / f"ct_small_{label}.png", optimize=True)
    # A counterfactual target: the soft-tissue window with a synthetic 'paraspinal mass' painted in.
    base = Image.fromarray(_window(hu, 40, 400))
    mass = Image.new("L", base.size, 0)
    ImageDraw.Draw(mass).ellipse((78, 70, 100, 92), fill=255)
    mass = mass.filter(ImageFilter.GaussianBlur(2))
    lesion = Image.composite(Image.new("L", base.size, 150), base, mass)
    lesion.save(out / "ct_small_soft_tissue_mass.png", optimize=True)

    mr = _dicom("MR_small.dcm")
    values = apply_modality_lut(mr.pixel_array, mr).astype(np.float64)
    out = IMAGES / "mr"
    out.mkdir(parents=True, exist_ok=True)
    center, width = float(mr.WindowCenter), float(mr.WindowWidth)     # the file's own VOI window
    Image.fromarray(_window(values, center, width)).save(out / "mr_small.png", optimize=True)
    Image.fromarray(_window(values, center, width)).resize((128, 128), Image.BICUBIC).save(
        out / "mr_small_x2.png", optimize=True)

    us = _dicom("examples_ybr_color.dcm")   # 30-frame ultrasound; pixel_array converts YBR_FULL_422 to RGB
    frames = us.pixel_array
    out = IMAGES / "us"
    out.mkdir(parents=True, exist_ok=True)
    for index in (0, 15):
        Image.fromarray(frames[index]).save(out / f"us_frame{index:02d}.jpg", quality=88)


def _he_from_ihc(tile: np.ndarray) -> np.ndarray:
    """Colour deconvolution (Ruifrok & Johnston H-E-DAB vectors) and re-render as an H&E-like image:
    hematoxylin keeps its blue-purple, the DAB signal is shown as eosin pink. Synthetic, for the example."""
    rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    hed_from_rgb = np.linalg.inv(rgb_from_hed)
    od = -np.log(np.maximum(tile.astype(np.float64), 1.0) / 255.0)
    hed = np.maximum(od.reshape(-1, 3) @ hed_from_rgb, 0.0)
    h, dab = hed[:, 0], hed[:, 2]
    eosin_like = 0.35 + 0.9 * dab       # stroma counterstain + former DAB areas
    he_vectors = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])   # hematoxylin, eosin
    od_out = np.outer(h, he_vectors[0]) + np.outer(eosin_like * 0.25, he_vectors[1])
    out = 255.0 * np.exp(-od_out)
    return np.clip(out, 0, 255).reshape(tile.shape).astype(np.uint8)


def make_skimage_files(data: Path) -> None:
    out = IMAGES / "fundus"
    out.mkdir(parents=True, exist_ok=True)
    retina = Image.open(data / "retina.jpg").convert("RGB")
    retina.resize((512, 512), Image.LANCZOS).save(out / "retina_512.jpg", quality=88)
    retina.crop((300, 450, 812, 962)).resize((384, 384), Image.LANCZOS).save(out / "retina_disc_crop.jpg",
                                                                             quality=88)
    Image.open(data / "microaneurysms.png").save(out / "microaneurysms.png", optimize=True)

    out = IMAGES / "pathology"
    out.mkdir(parents=True, exist_ok=True)
    ihc = np.asarray(Image.open(data / "ihc.png").convert("RGB"))
    for index, (y, x) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        tile = ihc[y:y + 256, x:x + 256]
        Image.fromarray(tile).save(out / f"ihc_tile{index}.png", optimize=True)
        Image.fromarray(_he_from_ihc(tile)).save(out / f"he_tile{index}.png", optimize=True)


def _img(path: str) -> dict:
    with Image.open(IMAGES / path) as image:
        width, height = image.size
    return {"path": path, "height": height, "width": width}


def _msgs(*pairs: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


def write_annotations() -> None:
    ANNOTATIONS.mkdir(parents=True, exist_ok=True)
    ct_soft, ct_bone, ct_lung = (f"ct/ct_small_{w}.png" for w in ("soft_tissue", "bone", "lung"))
    sets: dict[str, list[dict]] = {}
    sets["ct_mr_vqa"] = [
        {"input_img": [_img(ct_soft)], "message": _msgs(
            "<image>\nWhich imaging modality and plane is shown?",
            "An axial CT slice at the level of a thoracic vertebral body, displayed in a soft-tissue window.")},
        {"input_img": [_img(ct_bone)], "message": _msgs(
            "<image>\nDescribe the vertebral body.",
            "The vertebral body shows normal trabecular bone with intact cortical margins; no fracture "
            "line is visible on this slice.")},
        {"input_img": [_img(ct_lung)], "message": _msgs(
            "<image>\nWhat does the lung window emphasise on this slice?",
            "Air-containing structures: the soft tissues appear uniformly bright and the bone loses its "
            "internal detail, so this window is not suited to the spine.")},
        {"input_img": [_img(ct_soft), _img(ct_bone)], "message": _msgs(
            "Compare the two windows. <image> <image> Which is better for the posterior elements?",
            "The second image, in a bone window, shows the lamina and spinous process with clear cortical "
            "detail; the soft-tissue window saturates them.")},
        {"input_img": [_img("mr/mr_small.png")], "message": _msgs(
            "<image>\nIs this CT or MRI?", "MRI: the contrast comes from tissue relaxation, and no Hounsfield "
            "scale applies.",
            "<image>\nIs the image high resolution?", "No. It is a 64 x 64 downsampled test image, so fine "
            "anatomical detail cannot be assessed.")},
        {"input_img": [_img("us/us_frame00.jpg")], "message": _msgs(
            "<image>\nName the modality.", "Ultrasound: a sector-shaped B-mode echocardiography frame showing the cardiac chambers.")},
    ]
    sets["radiology_text_qa"] = [
        {"message": _msgs("What does a CT soft-tissue window of W400/L40 mean?",
                          "Pixels from -160 to 240 Hounsfield units are spread over the grey scale; values below "
                          "are black and values above are white.")},
        {"message": _msgs("<image> Why is MONOCHROME1 inverted before display?",
                          "In MONOCHROME1 the lowest value is white. Inverting it makes air dark, as readers "
                          "expect on radiographs.")},
        {"message": _msgs("Name two signs of a pleural effusion on a frontal chest radiograph.",
                          "Blunting of the costophrenic angle and a meniscus-shaped opacity at the lung base.")},
        {"message": _msgs("What is the Hounsfield unit of water?", "Zero, by definition.",
                          "And of air?", "About -1000.")},
    ]
    sets["ct_recon_v1"] = [
        {"input_img": [_img(ct_soft)], "message": _msgs("<image>\nSummarise this CT slice.",
                                                        "Axial CT of a thoracic vertebra with the descending "
                                                        "aorta anterior-left of the spine.")},
        {"input_img": [_img(ct_bone)], "message": _msgs("<image>\nWhat window is used?",
                                                        "A bone window (W1800/L400).")},
        {"input_img": [_img("mr/mr_small_x2.png")], "message": _msgs("Describe the image. <image>",
                                                                     "A small axial MR test image.")},
    ]
    sets["mr_recon_v2"] = [
        {"input_img": [_img("mr/mr_small.png")], "message": _msgs("<image>\nWhat sequence could this be?",
                                                                  "The header does not say; the contrast is "
                                                                  "compatible with a T1-weighted image.")},
        {"input_img": [_img("mr/mr_small_x2.png")], "message": _msgs("<image>\nIs the image upsampled?",
                                                                     "Yes, from 64 x 64 to 128 x 128.")},
        {"input_img": [_img("us/us_frame15.jpg")], "message": _msgs("<image>\nWhich frame of the cine loop is "
                                                                    "this?", "Frame 15 of 30.")},
    ]
    sets["fundus_t2i"] = [
        {"output_img": [_img("fundus/retina_512.jpg")], "message": _msgs(
            "Colour fundus photograph of a normal left eye, optic disc and macula in view.")},
        {"output_img": [_img("fundus/retina_disc_crop.jpg")], "message": _msgs(
            "Close-up fundus view of a healthy optic disc with sharp margins.")},
        {"output_img": [_img("fundus/microaneurysms.png")], "message": _msgs(
            "Green-channel fundus detail with small red dots consistent with microaneurysms.")},
        {"output_img": [_img("fundus/retina_512.jpg")], "message": _msgs(
            "Generate a fundus photograph.", "A normal fundus with a well-defined optic disc.")},
    ]
    sets["he_to_ihc_edit"] = [
        {"input_img": [_img(f"pathology/he_tile{i}.png")], "output_img": [_img(f"pathology/ihc_tile{i}.png")],
         "message": _msgs("<image>\nTranslate this H&E-stained colon tissue tile into the matching IHC (DAB) "
                          "stain.", "This is the IHC rendering of the same field: DAB-positive glands in brown "
                                    "with hematoxylin counterstain.")}
        for i in range(4)
    ]
    sets["cxr_counterfactual"] = [
        {"input_img": [_img(ct_soft)], "output_img": [_img("ct/ct_small_soft_tissue_mass.png")],
         "message": _msgs("<image>\nShow how this image would look with a 2 cm left paraspinal soft-tissue mass.",
                          "The counterfactual adds a rounded soft-tissue density to the left of the vertebral "
                          "body; bone and aorta are unchanged.")},
        {"input_img": [_img("ct/ct_small_soft_tissue_mass.png")], "output_img": [_img(ct_soft)],
         "message": _msgs("<image>\nGenerate the counterfactual image as if the paraspinal mass had resolved, in "
                          "the style of a follow-up chest study.",
                          "The left paraspinal density is removed; the remaining anatomy matches the input.")},
        {"input_img": [_img(ct_soft)], "output_img": [_img(ct_soft)],
         "message": _msgs("<image>\nWhat would this chest study look like without a pleural effusion?",
                          "No effusion is visible on the input, so the counterfactual is unchanged.")},
    ]
    sets["fundus_vlm_sft"] = [
        {"image": "fundus/retina_512.jpg", "conversations": _msgs("<image>\nIs this fundus normal?",
                                                                  "Yes: the optic disc, vessels and macula "
                                                                  "look normal.")},
        {"image": ["fundus/retina_512.jpg", "fundus/retina_disc_crop.jpg"], "conversations": _msgs(
            "<image> is the whole fundus and <image> a crop. What does the crop show?",
            "The optic disc with its central cup and the emerging retinal vessels.")},
        {"image": "fundus/microaneurysms.png", "conversations": _msgs(
            "<image>\nWhat lesions are visible?", "Small round dark dots consistent with microaneurysms, an "
                                                 "early sign of diabetic retinopathy.")},
        {"image": "pathology/ihc_tile0.png", "conversations": _msgs(
            "<image>\nWhich stain is this?", "Immunohistochemistry with DAB (brown) and hematoxylin "
                                             "counterstain (blue).",
            "Is it fundus photography?", "No, it is a histology tile.")},
    ]
    for name, records in sets.items():
        with open(ANNOTATIONS / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print({name: len(records) for name, records in sets.items()}, sum(map(len, sets.values())), "records")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skimage-data", type=Path, help="folder with retina.jpg, ihc.png, microaneurysms.png")
    args = parser.parse_args()
    make_dicom_pngs()
    if args.skimage_data:
        make_skimage_files(args.skimage_data)
    write_annotations()


if __name__ == "__main__":
    main()
