"""Miniature copies of the official dataset layouts, written into a test's tmp_path.

Each builder uses the dataset's own file names and CSV columns, a few 8x8 images, and the
awkward rows the adapters must cope with (missing files, missing labels, odd ages). The
images are tiny synthetic PNG / JPEG / DICOM files: adapters never decode them, but they are
real image files so that a reader could.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from spcxr.data.records import Record, Skip


def write_image(path: Path, value: int = 128, size: int = 8) -> Path:
    """An 8-bit grey image (format from the suffix: .png, .jpeg, .jpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def write_dicom(path: Path, patient_id: str, size: int = 8) -> Path:
    """A minimal valid DICOM (secondary capture, MONOCHROME2, 8-bit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientSex = "F"
    ds.PatientAge = "045Y"
    ds.ViewPosition = "PA"
    ds.Modality = "CR"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(size * size)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, header: list[str], rows: Iterable[list[object]]) -> Path:
    """A CSV file with ``header`` and ``rows`` (None -> empty cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def split_items(items: list[Record | Skip]) -> tuple[list[Record], list[Skip]]:
    """Records and skips of a source listing, in order."""
    records = [item for item in items if isinstance(item, Record)]
    skips = [item for item in items if isinstance(item, Skip)]
    return records, skips


def by_name(records: list[Record]) -> dict[str, Record]:
    """Records keyed by image file name."""
    return {Path(record.image_path).name: record for record in records}


# -- Kermany / folder of class folders ------------------------------------------------------

KERMANY_FILES = {
    ("train", "NORMAL"): ["IM-0115-0001.jpeg", "IM-0429-0001-0002.jpeg", "IM-0429-0001.jpeg",
                          "NORMAL2-IM-0383-0001.jpeg", "scan_07.jpeg"],
    ("train", "PNEUMONIA"): ["person1_bacteria_1.jpeg", "person1_virus_6.jpeg",
                             "person22_virus_55.jpeg", "person1000_virus_1681_1.jpeg"],
    ("val", "NORMAL"): ["NORMAL2-IM-1427-0001.jpeg"],
    ("val", "PNEUMONIA"): ["person1946_bacteria_4874.jpeg"],
    ("test", "NORMAL"): ["IM-0001-0001.jpeg"],
    ("test", "PNEUMONIA"): ["person100_bacteria_475.jpeg"],
}  # fmt: skip


def make_kermany(root: Path) -> Path:
    """``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}`` with Kermany file names.

    Adds the clutter of the Kaggle zip: ``.DS_Store`` files, a ``__MACOSX`` folder, a
    non-image file and a nested duplicate ``chest_xray/`` copy of the dataset.
    """
    for (split, cls), names in KERMANY_FILES.items():
        for name in names:
            write_image(root / split / cls / name)
            write_image(root / "chest_xray" / split / cls / name)
    write_text(root / "train" / "NORMAL" / ".DS_Store", "x")
    write_text(root / "train" / "PNEUMONIA" / "notes.txt", "not an image")
    write_image(root / "__MACOSX" / "train" / "._IM-0115-0001.jpeg")
    return root


# -- Shenzhen -------------------------------------------------------------------------------

SHENZHEN_READINGS = {
    "CHNCXR_0001_0": "Male 45yrs\nnormal\n",
    "CHNCXR_0002_0": "female 35yr\n\nnormal\n",
    "CHNCXR_0327_1": "male 27yrs\nSTB,ATB,tuberculosis pleuritis\nleft upper\n",
    "CHNCXR_0328_1": "femal, 24yrs\nbilateral PTB\n",
    "CHNCXR_0329_1": "Male 10month\nATB\n",
}


def make_shenzhen(root: Path, mask_dir: str = "mask") -> Path:
    """``ChinaSet_AllFiles/{CXR_png,ClinicalReadings}`` and Stirenko et al. masks.

    CHNCXR_0329_1 has no mask; CHNCXR_0330_1 has no clinical reading; ``CXR_png`` also holds
    a wrongly named image and ``Thumbs.db``.
    """
    base = root / "ChinaSet_AllFiles"
    for stem in [*SHENZHEN_READINGS, "CHNCXR_0330_1"]:
        write_image(base / "CXR_png" / f"{stem}.png")
    write_image(base / "CXR_png" / "CHNCXR_extra.png")
    write_text(base / "CXR_png" / "Thumbs.db", "x")
    for stem, text in SHENZHEN_READINGS.items():
        write_text(base / "ClinicalReadings" / f"{stem}.txt", text)
    for stem in ["CHNCXR_0001_0", "CHNCXR_0002_0", "CHNCXR_0327_1", "CHNCXR_0328_1",
                 "CHNCXR_0330_1"]:  # fmt: skip
        write_image(root / mask_dir / f"{stem}_mask.png", 255)
    return root


def make_shenzhen_reduced(root: Path) -> Path:
    """The shared reduced copy's layout: ``manifest.csv`` + ``images/`` + ``masks/``."""
    header = ["file", "mask_file", "label", "abnormal", "dataset", "patient_id", "view",
              "split", "width", "height"]  # fmt: skip
    rows = [
        ["images/CHNCXR_0001_0.png", "masks/CHNCXR_0001_0.png", "normal", 0, "shenzhen",
         "CHNCXR_0001", "PA", "train_with_mask", 8, 8],
        ["images/CHNCXR_0400_1.png", "", "tuberculosis", 1, "shenzhen", "", "", "no_mask", 8, 8],
        ["images/CHNCXR_0401_1.png", "", "tuberculosis", 1, "shenzhen", "CHNCXR_0401", "PA",
         "no_mask", 8, 8],
    ]  # fmt: skip
    write_csv(root / "manifest.csv", header, rows)
    write_image(root / "images" / "CHNCXR_0001_0.png")
    write_image(root / "images" / "CHNCXR_0400_1.png")
    write_image(root / "masks" / "CHNCXR_0001_0.png", 255)
    return root  # CHNCXR_0401_1.png is listed but missing


# -- Montgomery -----------------------------------------------------------------------------

MONTGOMERY_READINGS = {
    "MCUCXR_0001_0": "Patient's Sex: F\nPatient's Age: 040Y\nnormal\n",
    "MCUCXR_0002_0": "Patient's Sex: M\nPatient's Age: 006M\n\nnormal\n",
    "MCUCXR_0104_1": "Patient's Sex: M\nPatient's Age: 052Y\nRight upper lobe cavity; TB\n",
    "MCUCXR_0105_1": "Patient's Sex: O\nPatient's Age: \nbilateral infiltrates\n",
}


def make_montgomery(root: Path) -> Path:
    """``MontgomerySet/{CXR_png,ClinicalReadings,ManualMask/{left,right}Mask}``.

    MCUCXR_0105_1 has only a left mask; MCUCXR_0106_1 has no reading and no masks.
    """
    base = root / "MontgomerySet"
    for stem in [*MONTGOMERY_READINGS, "MCUCXR_0106_1"]:
        write_image(base / "CXR_png" / f"{stem}.png")
    for stem, text in MONTGOMERY_READINGS.items():
        write_text(base / "ClinicalReadings" / f"{stem}.txt", text)
    for stem in ["MCUCXR_0001_0", "MCUCXR_0002_0", "MCUCXR_0104_1", "MCUCXR_0105_1"]:
        write_image(base / "ManualMask" / "leftMask" / f"{stem}.png", 255)
    for stem in ["MCUCXR_0001_0", "MCUCXR_0002_0", "MCUCXR_0104_1"]:
        write_image(base / "ManualMask" / "rightMask" / f"{stem}.png", 255)
    write_image(base / "CXR_png" / "MCUCXR_bad.png")
    return root


# -- ieee8023 COVID-19 image data collection --------------------------------------------------

IEEE8023_HEADER = ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive",
                   "survival", "intubated", "view", "modality", "date", "location", "folder",
                   "filename", "doi", "url", "license", "clinical_notes", "other_notes"]  # fmt: skip


def _ieee_row(pid: str, finding: str, view: str, modality: str, filename: str,
              sex: str = "M", age: str = "65", offset: str = "0",
              folder: str = "images") -> list[str]:  # fmt: skip
    return [pid, offset, sex, age, finding, "Y", "", "", view, modality, "2020", "Wuhan",
            folder, filename, "10.1/x", "https://example.org/a", "CC BY 4.0", "note", ""]  # fmt: skip


def make_ieee8023(root: Path) -> Path:
    """``metadata.csv`` + ``images/`` (and a CT row in ``volumes/``), official columns."""
    rows = [
        _ieee_row("2", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "a-covid.jpeg", offset="3"),
        _ieee_row("2", "Pneumonia/Viral/COVID-19", "L", "X-ray", "b-covid-lat.jpeg"),
        _ieee_row("5", "Pneumonia/Bacterial/Streptococcus", "AP Supine", "X-ray", "strep.png",
                  sex="F", age="?"),
        _ieee_row("7", "No Finding", "AP Erect", "X-ray", "normal.jpg", sex="", age="30"),
        _ieee_row("8", "todo", "AP", "X-ray", "todo.png"),
        _ieee_row("9", "Pneumonia/Lipoid", "PA", "X-ray", "lipoid.png"),
        _ieee_row("10", "Tuberculosis", "PA", "X-ray", "tb.png"),
        _ieee_row("11", "Pneumonia/Aspiration", "PA", "X-ray", "aspiration.png"),
        _ieee_row("12", "ARDS", "PA", "X-ray", "ards.png"),
        _ieee_row("2", "Pneumonia/Viral/COVID-19", "Axial", "CT", "ct.nii.gz", folder="volumes"),
        _ieee_row("13", "Pneumonia/Viral/SARS", "PA", "X-ray", "missing.png"),
        _ieee_row("", "Pneumonia", "PA", "X-ray", "no-patient.png"),
    ]  # fmt: skip
    write_csv(root / "metadata.csv", IEEE8023_HEADER, rows)
    for row in rows:
        if row[13] not in {"missing.png", "ct.nii.gz"}:
            write_image(root / row[12] / row[13])
    write_text(root / "volumes" / "ct.nii.gz", "not an image")
    write_image(root / "lungmasks" / "a-covid_mask.png", 255)
    write_image(root / "lungmasks" / "strep.png", 255)
    return root


def make_ieee8023_reduced(root: Path) -> Path:
    """The shared reduced copy's ``manifest.csv`` layout."""
    header = ["file", "mask_file", "ignore_mask_file", "label", "finding", "patient_id",
              "offset_days", "sex", "age", "view", "modality", "survival", "split", "width",
              "height", "license", "doi", "dhash"]  # fmt: skip
    rows = [
        ["images/000001-12.png", "", "", "other_pneumonia", "Pneumonia", "281", "14", "F",
         "71", "PA", "X-ray", "Y", "", 8, 8, "CC BY-NC-SA 4.0", "", "1010"],
        ["images/covid-a.png", "masks/covid-a.png", "ignore_masks/covid-a.png", "covid19",
         "COVID-19, ARDS", "360b", "", "M", "", "AP Supine", "X-ray", "?", "", 8, 8, "CC BY",
         "10.1/y", "0101"],
        ["images/todo.png", "", "", "unknown", "todo", "360b", "", "", "", "?", "X-ray", "",
         "", 8, 8, "CC BY", "", "0000"],
    ]  # fmt: skip
    write_csv(root / "manifest.csv", header, rows)
    for row in rows:
        write_image(root / row[0])
    write_image(root / "masks" / "covid-a.png", 255)
    write_image(root / "ignore_masks" / "covid-a.png", 255)
    return root


# -- COVIDx -----------------------------------------------------------------------------------


def make_covidx(root: Path) -> Path:
    """COVIDx CXR-4: ``{train,val,test}.txt`` + image folders."""
    lines = {
        "train": [
            "419639-003251 MIDRC-RICORD-1C-419639-003251-46647-0.png positive ricord",
            "ANON66 A035989-01-07-1901-NA-CHEST_AP_PORT-10853-3.png negative bimcv",
            "  ",
            "8dd1d1b4-7e1f 8dd1d1b4-7e1f.png negative rsna",
            "broken-line-without-file negative",
            "p7 COVID (7).png positive cohen",
            "p9 missing.png positive cohen",
        ],
        "val": ["p3 val-1.png negative sirm"],
        "test": ["p4 test-1.png positive stonybrook", "p5 test-2.png negative rsna"],
    }
    for split, split_lines in lines.items():
        write_text(root / f"{split}.txt", "\n".join(split_lines) + "\n")
        for line in split_lines:
            tokens = line.split()
            if len(tokens) >= 4 and "missing" not in line:
                write_image(root / split / " ".join(tokens[1:-2]))
    return root


def make_covidx_v1(root: Path) -> Path:
    """An early COVIDx release: three classes, no val list."""
    write_text(
        root / "train.txt",
        "3 covid-1.png COVID-19 cohen\n5 normal-1.png normal rsna\n6 pneu-1.png pneumonia rsna\n",
    )
    write_text(root / "test.txt", "7 normal-2.png normal rsna\n")
    for name in ("covid-1.png", "normal-1.png", "pneu-1.png"):
        write_image(root / "train" / name)
    write_image(root / "test" / "normal-2.png")
    return root


# -- RSNA Pneumonia Detection Challenge -------------------------------------------------------


def make_rsna(root: Path, stage: str = "stage_2") -> Path:
    """``{stage}_train_labels.csv``, ``{stage}_detailed_class_info.csv``, DICOM images.

    ``aaa`` has two boxes, ``bbb`` none, ``ccc`` no image file, ``ddd`` no Target,
    ``eee`` Target 2, plus one row without a patientId.
    """
    labels = [
        ["aaa", "264", "152", "213", "379", 1],
        ["aaa", "562", "152", "256", "453", 1],
        ["bbb", "", "", "", "", 0],
        ["ccc", "", "", "", "", 0],
        ["ddd", "", "", "", "", ""],
        ["eee", "", "", "", "", 2],
        ["", "", "", "", "", 0],
        ["fff", "", "", "", "", 0],
    ]
    write_csv(root / f"{stage}_train_labels.csv",
              ["patientId", "x", "y", "width", "height", "Target"], labels)  # fmt: skip
    classes = [["aaa", "Lung Opacity"], ["aaa", "Lung Opacity"],
               ["bbb", "No Lung Opacity / Not Normal"], ["ccc", "Normal"], ["fff", "Normal"]]  # fmt: skip
    write_csv(root / f"{stage}_detailed_class_info.csv", ["patientId", "class"], classes)
    for pid in ("aaa", "bbb", "ddd", "eee", "fff"):
        write_dicom(root / f"{stage}_train_images" / f"{pid}.dcm", pid)
    return root


# -- NIH ChestX-ray14 -------------------------------------------------------------------------

NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
              "OriginalImagePixelSpacing[x", "y]", ""]  # fmt: skip


def make_nih(root: Path, csv_name: str = "Data_Entry_2017.csv") -> Path:
    """Data_Entry CSV (old style: trailing empty column, ages like ``058Y``), image archives
    ``images_001/images`` and ``images_002/images``, split lists."""
    rows = [
        ["00000001_000.png", "Cardiomegaly", "0", "1", "058Y", "M", "PA", 2682, 2749, 0.14, 0.14, ""],
        ["00000001_001.png", "Cardiomegaly|Emphysema", "1", "1", "58", "M", "PA", 2894, 2729, 0.14, 0.14, ""],
        ["00000002_000.png", "No Finding", "0", "2", "81", "F", "AP", 2500, 2048, 0.17, 0.17, ""],
        ["00000003_000.png", "Hernia|Pleural_Thickening", "0", "3", "414", "F", "PA", 2582, 2991, 0.14, 0.14, ""],
        ["00000004_000.png", "Mass|Nodule", "0", "4", "82", "M", "AP", 2500, 2048, 0.17, 0.17, ""],
        ["00000005_000.png", "", "0", "5", "69", "F", "PA", 2048, 2500, 0.17, 0.17, ""],
        ["00000006_000.png", "No Finding", "0", "6", "81", "M", "PA", 2048, 2500, 0.17, 0.17, ""],
    ]  # fmt: skip
    write_csv(root / csv_name, NIH_HEADER, rows)
    for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png"):
        write_image(root / "images_001" / "images" / name)
    for name in ("00000003_000.png", "00000005_000.png", "00000006_000.png"):
        write_image(root / "images_002" / "images" / name)
    write_text(
        root / "train_val_list.txt", "00000001_000.png\n00000001_001.png\n00000003_000.png\n"
    )
    write_text(root / "test_list.txt", "00000002_000.png\n")
    return root  # 00000004_000.png is listed but missing; 00000006_000.png is in no list


# -- CheXpert ---------------------------------------------------------------------------------

CHEXPERT_OBSERVATIONS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
                         "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                         "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                         "Fracture", "Support Devices"]  # fmt: skip
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]


def _chexpert_row(path: str, sex: str, age: str, frontal: str, ap_pa: str,
                  **values: str) -> list[str]:  # fmt: skip
    cells = [values.get(name.replace(" ", "_").lower(), "") for name in CHEXPERT_OBSERVATIONS]
    return [path, sex, age, frontal, ap_pa, *cells]


def make_chexpert(root: Path, folder: str = "CheXpert-v1.0-small") -> Path:
    """``{folder}/train.csv`` + ``valid.csv`` with paths that start with ``folder``."""
    base = root / folder
    prefix = "CheXpert-v1.0-small"  # the CSVs keep the original name even if renamed
    train = [
        _chexpert_row(f"{prefix}/train/patient00001/study1/view1_frontal.jpg", "Female", "68",
                      "Frontal", "AP", no_finding="", support_devices="1.0",
                      cardiomegaly="-1.0", edema="0.0"),
        _chexpert_row(f"{prefix}/train/patient00002/study2/view1_frontal.jpg", "Male", "87",
                      "Frontal", "PA", no_finding="1.0"),
        _chexpert_row(f"{prefix}/train/patient00002/study2/view2_lateral.jpg", "Male", "87",
                      "Lateral", "", no_finding="1.0"),
        _chexpert_row(f"{prefix}/train/patient00003/study1/view1_frontal.jpg", "Unknown", "0",
                      "Frontal", "AP", lung_opacity="1.0", pneumonia="-1.0"),
        _chexpert_row(f"{prefix}/train/patient00004/study1/view1_frontal.jpg", "Female", "40",
                      "Frontal", "PA", edema="1.0"),
        _chexpert_row(f"{prefix}/train/scans/view1_frontal.jpg", "Female", "40",
                      "Frontal", "PA", edema="1.0"),
        _chexpert_row("", "Female", "40", "Frontal", "PA", edema="1.0"),
    ]  # fmt: skip
    valid = [
        _chexpert_row(f"{prefix}/valid/patient64541/study1/view1_frontal.jpg", "Male", "73",
                      "Frontal", "AP", no_finding="0.0", edema="1.0", cardiomegaly="0.0"),
    ]  # fmt: skip
    write_csv(base / "train.csv", CHEXPERT_HEADER, train)
    write_csv(base / "valid.csv", CHEXPERT_HEADER, valid)
    for row in [*train[:-1], *valid]:
        relative = row[0].split("/", 1)[1]
        if "patient00004" not in relative:
            write_image(base / relative)
    return root  # patient00004 is listed but missing


# -- generic CSV manifest ---------------------------------------------------------------------


def make_manifest(root: Path) -> Path:
    """A hospital export described by ``manifest.csv`` with common column names."""
    header = ["filename", "PatientID", "Label", "mask", "View", "Sex", "Age", "split", "site",
              "note"]  # fmt: skip
    rows = [
        ["img/a.png", "P1", "Pneumonia", "masks/a_left.png;masks/a_right.png", "pa", "female",
         "045Y", "training", "ward 3", "x"],
        ["img/b.png", "", "Normal", "", "AP Supine", "M", "6 months", "validation", "", ""],
        ["img/c.png", "P3", "", "", "", "", "", "test", "", ""],
        ["img/d.png", "P4", "normal", "masks/gone.png", "--", "?", "nan", "holdout", "", "y"],
        ["img/f.png", "P8", "NaN", "", "", "", "", "", "", ""],
        ["", "P5", "normal", "", "", "", "", "", "", ""],
        ["img/missing.png", "P6", "normal", "", "", "", "", "", "", ""],
        [str(root / "elsewhere" / "e.png"), "P7", "COVID-19", "", "L", "F", "30", "test", "", ""],
        ["./img//a.png", "P9", "Normal", "", "", "", "", "", "", ""],  # a.png again
    ]  # fmt: skip
    write_csv(root / "manifest.csv", header, rows)
    for name in ("img/a.png", "img/b.png", "img/c.png", "img/d.png", "img/f.png",
                 "elsewhere/e.png"):  # fmt: skip
        write_image(root / name)
    write_image(root / "masks" / "a_left.png", 255)
    write_image(root / "masks" / "a_right.png", 255)
    return root
