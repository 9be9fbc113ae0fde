"""Tiny vision datasets in their real formats: UTKFace file names, CIFAR pickles, ImageFolder JPEGs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

UTK_AGES = (1, 25, 45, 70)  # one face a cell in each default age band (0-19, 20-39, 40-59, 60+)
UTK_BAD = ("39_1_20170116174525125.jpg.chip.jpg", "x_0_0_20170116174525125.jpg", "30_7_1_20170116174525125.jpg")


def _jpeg(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def write_utkface(folder: Path, per_cell: int = 2, size: int = 12, official: bool = False) -> Path:
    """Faces named ``<age>_<gender>_<race>_<datetime>.jpg`` (``.jpg.chip.jpg`` when ``official``), ``per_cell`` per
    race x gender x age band, plus the malformed names of :data:`UTK_BAD` (no race field, a letter, gender 7).

    Pixels are noise with a brightness that follows gender, so a model can learn something.
    """
    rng = np.random.default_rng(0)
    suffix = ".jpg.chip.jpg" if official else ".jpg"
    stamp = 20170116000000000
    for race in range(5):
        for gender in range(2):
            for age in UTK_AGES:
                for _ in range(per_cell):
                    stamp += 1
                    pixels = rng.integers(0, 128, (size, size, 3)) + 100 * gender
                    _jpeg(folder / f"{age}_{gender}_{race}_{stamp}{suffix}", pixels.astype(np.uint8))
    for name in UTK_BAD:
        _jpeg(folder / name, np.zeros((size, size, 3), np.uint8))
    (folder / "README.txt").write_text("not an image\n")
    return folder


def write_cifar_pickles(root: Path, dataset: str, per_class_train: int, per_class_test: int) -> Path:
    """``cifar-10-batches-py`` (5 data batches, test batch, ``batches.meta``) or ``cifar-100-python`` (train, test,
    meta with fine and coarse names), pickled with the official keys and layout (``data`` uint8 [N, 3072], channel
    planes R, G, B); the red plane codes the class, so a reader that mixes up the layout fails."""
    from dplit.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES

    rng = np.random.default_rng(1)
    classes = 10 if dataset == "cifar10" else 100

    def records(per_class: int) -> tuple[np.ndarray, list[int]]:
        labels = [c for c in range(classes) for _ in range(per_class)]
        order = rng.permutation(len(labels))
        labels = [labels[i] for i in order]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        data[:, :1024] = np.asarray(labels, dtype=np.uint8)[:, None] * (250 // classes)  # red plane codes the class
        return data, labels

    def dump(path: Path, obj: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            pickle.dump(obj, f, protocol=2)

    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        data, labels = records(per_class_train)
        for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
            dump(folder / f"data_batch_{i}", {"batch_label": "training batch", "labels": [labels[j] for j in part],
                                              "data": data[part], "filenames": ["x.png"] * len(part)})  # fmt: skip
        data, labels = records(per_class_test)
        dump(folder / "test_batch", {"batch_label": "testing batch", "labels": labels, "data": data})
        dump(folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 10000, "num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        for name, per_class in (("train", per_class_train), ("test", per_class_test)):
            data, labels = records(per_class)
            dump(folder / name, {"fine_labels": labels, "coarse_labels": [c // 5 for c in labels], "data": data})
        dump(folder / "meta", {"fine_label_names": CIFAR100_CLASSES,
                               "coarse_label_names": [f"coarse{c}" for c in range(20)]})  # fmt: skip
    return root


def write_cifar_imagefolder(root: Path, per_class_train: int, per_class_test: int, classes: int = 10) -> Path:
    """``{train,test}/<class>/NNNN.jpg`` 32x32 JPEGs named as the CIFAR-10 (JPEG) copy."""
    from dplit.data.cifar import CIFAR10_CLASSES

    rng = np.random.default_rng(2)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        for c, name in enumerate(CIFAR10_CLASSES[:classes]):
            for i in range(per_class):
                pixels = rng.integers(0, 100, (32, 32, 3)) + 15 * c
                _jpeg(root / split / name / f"{i:04d}.jpg", pixels.astype(np.uint8))
    return root


def vision_data_args(text: str, request) -> list[str] | None:
    """Command-line overrides that point a vision config at a tiny fixture (None: not a vision config).

    Images shrink to 16-20 pixels, the config's under-represented group is cut to 5 faces to fit the fixture, epochs
    to 3 steps (so validation runs), and a timm backbone becomes timm's tiny ``test_efficientnet`` without weights
    (its BatchNorm treatment and trainable layers stay the config's; the real weights are tested in
    test_vision_models.py: a real EfficientNet-Lite0 takes 10-20 s for 3 steps here).
    """
    args = ["--trainer.limit_train_batches=3"]
    if "dplit.models.TimmBackbone" in text:
        args += ["--model.init_args.backbone.init_args.name=test_efficientnet",
                 "--model.init_args.backbone.init_args.weights=null",
                 "--model.init_args.backbone.init_args.pretrained=false"]  # fmt: skip
    if "dplit.data.UTKFaceDataModule" in text:
        args += [f"--data.init_args.root={request.getfixturevalue('utkface_root')}", "--data.init_args.resize=20",
                 "--data.init_args.crop=16", "--data.init_args.batch_size=16",
                 "--data.init_args.eval_batch_size=16"]  # fmt: skip
        return args + (["--data.init_args.underrepresented={Black: 5}"] if "underrepresented:" in text else [])
    small = ["--data.init_args.resize=20", "--data.init_args.crop=16", "--data.init_args.batch_size=16",
             "--data.init_args.eval_batch_size=16"]  # fmt: skip
    if "dplit.data.FairFaceDataModule" in text:
        root = write_fairface(request.getfixturevalue("tmp_path_factory").mktemp("fairface"))
        return args + [f"--data.init_args.root={root}", "--data.init_args.underrepresented={Black: 3}", *small]
    if "dplit.data.CelebADataModule" in text:
        from torchvision.datasets import CelebA

        request.getfixturevalue("monkeypatch").setattr(CelebA, "_check_integrity", lambda self: True)  # not official
        root = write_celeba(request.getfixturevalue("tmp_path_factory").mktemp("celeba"), n=40)
        return args + [f"--data.init_args.root={root}", *small]
    if "dplit.data.CheXpertDataModule" in text:
        root = write_chexpert(request.getfixturevalue("tmp_path_factory").mktemp("chexpert"))
        return args + [f"--data.init_args.root={root}", f"--data.init_args.demographics={root / 'CHEXPERT DEMO.csv'}",
                       "--data.init_args.val_fraction=0.3",
                       *(a.replace("batch_size=16", "batch_size=8") for a in small)]  # fmt: skip
    if "dplit.data.INaturalistDataModule" in text:
        root = write_inaturalist(request.getfixturevalue("tmp_path_factory").mktemp("inat"), per_category=12)
        return args + [f"--data.init_args.root={root}", "--trainer.accelerator=cpu", "--data.init_args.num_workers=0",
                       "--data.init_args.val_fraction=0.2", "--data.init_args.test_fraction=0.2", *small]  # fmt: skip
    if "dplit.data.CIFARDataModule" in text:
        cifar100 = "dataset: cifar100" in text
        root = request.getfixturevalue("cifar100_root" if cifar100 else "cifar_jpeg_root")
        return args + [f"--data.init_args.root={root}", "--data.init_args.download=false",
                       f"--data.init_args.val_size={20 if cifar100 else 10}", "--data.init_args.resize=16",
                       "--data.init_args.crop=16", "--data.init_args.batch_size=16",
                       "--data.init_args.eval_batch_size=16"]  # fmt: skip
    return None


def write_fairface(root: Path, per_race: int = 4, size: int = 12) -> Path:
    """FairFace's release layout: ``fairface_label_{train,val}.csv`` (``file,age,gender,race,service_test``) and
    ``train/N.jpg``, ``val/N.jpg``; ``per_race`` training faces and 1 validation face a race, plus one training row
    with an unknown race value (skipped and reported)."""
    from dplit.data.fairface import AGES, GENDERS, RACES

    rng = np.random.default_rng(3)
    for split, n in (("train", per_race), ("val", 1)):
        rows = ["file,age,gender,race,service_test"]
        index = 0
        for r, race in enumerate(RACES):
            for i in range(n):
                index += 1
                gender, age = GENDERS[(i + r) % 2], AGES[(i + 2 * r) % len(AGES)]
                pixels = rng.integers(0, 128, (size, size, 3)) + 100 * ((i + r) % 2)
                _jpeg(root / split / f"{index}.jpg", pixels.astype(np.uint8))
                rows.append(f"{split}/{index}.jpg,{age},{gender},{race},{'True' if i % 2 else 'False'}")
        if split == "train":
            rows.append(f"train/{index}.jpg,20-29,Male,Martian,False")
        (root / f"fairface_label_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def write_celeba(root: Path, n: int = 12, size: int = 12) -> Path:
    """CelebA's files in torchvision's layout ``ROOT/celeba/`` (space-aligned text files as released, attributes
    -1/1, partition 0/1/2 = train/valid/test: half, a quarter, a quarter) and ``img_align_celeba/NNNNNN.jpg``."""
    from dplit.data.celeba import ATTRIBUTES

    rng = np.random.default_rng(4)
    folder = root / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    attrs = rng.choice([-1, 1], size=(n, len(ATTRIBUTES)))
    for name in names:
        _jpeg(folder / "img_align_celeba" / name, rng.integers(0, 255, (size, size, 3)).astype(np.uint8))
    part = [0] * (n // 2) + [1] * (n // 4) + [2] * (n - n // 2 - n // 4)
    (folder / "list_eval_partition.txt").write_text("".join(f"{a} {p}\n" for a, p in zip(names, part)))
    (folder / "identity_CelebA.txt").write_text("".join(f"{a} {2880 + i}\n" for i, a in enumerate(names)))
    (folder / "list_attr_celeba.txt").write_text(
        f"{n}\n" + " ".join(ATTRIBUTES) + " \n"
        + "".join(a + " " + " ".join(f"{v:2d}" for v in row) + "\n" for a, row in zip(names, attrs))
    )  # fmt: skip
    (folder / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{a}    95  71 226 313\n" for a in names)
    )
    landmarks = " ".join(f"{p}_{c}" for p in ("lefteye", "righteye", "nose", "leftmouth", "rightmouth") for c in "xy")
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\n{landmarks}\n" + "".join(f"{a} 69  109  106  113   77  142   73  152  108  154\n" for a in names)
    )
    return root


CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
                   "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
                   "Fracture,Support Devices")  # fmt: skip
CHEXPERT_RACES = ("White", "Black or African American", "Asian, non-Hispanic", "Other", "Patient Refused")


def write_chexpert(root: Path, patients: int = 20, size: int = 16) -> Path:
    """CheXpert-v1.0-small as released: ``train.csv``/``valid.csv`` (labels ``1.0``/``0.0``/``-1.0``/blank in
    train, no uncertain ones in valid), grey JPEGs at ``{train,valid}/patientNNNNN/studyN/viewN_{frontal,lateral}
    .jpg``, plus ``CHEXPERT DEMO.csv`` (``PATIENT,GENDER,AGE_AT_CXR,PRIMARY_RACE,ETHNICITY``; the last patient
    missing). Each training patient has a frontal and a lateral view; one row has sex ``Unknown`` (skipped)."""
    rng = np.random.default_rng(5)
    release = root / "CheXpert-v1.0-small"
    demo = ["PATIENT,GENDER,AGE_AT_CXR,PRIMARY_RACE,ETHNICITY"]
    for split, count, first in (("train", patients, 1), ("valid", max(4, patients // 4), 64541)):
        rows = [CHEXPERT_HEADER]
        for i in range(count):
            pid = f"patient{first + i:05d}"
            sex, age = ("Female", "Male")[i % 2], 20 + (i * 7) % 70
            views = ("frontal", "lateral") if split == "train" else ("frontal",)
            for v, view in enumerate(views, start=1):
                rel = f"CheXpert-v1.0-small/{split}/{pid}/study1/view{v}_{view}.jpg"
                if split == "train":
                    cells = [rng.choice(["1.0", "0.0", "-1.0", ""]) for _ in range(14)]
                else:
                    cells = [rng.choice(["1.0", "0.0"]) for _ in range(14)]
                frontal = view == "frontal"
                rows.append(f"{rel},{sex},{age},{'Frontal' if frontal else 'Lateral'},{'AP' if frontal else ''},"
                            + ",".join(cells))  # fmt: skip
                pixels = rng.integers(0, 255, (size, size)).astype(np.uint8)
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                from PIL import Image

                Image.fromarray(pixels, mode="L").save(path, format="JPEG")
            if i < count - 1:
                race = CHEXPERT_RACES[i % len(CHEXPERT_RACES)]
                demo.append(f'{pid},{sex},{age},"{race}",Non-Hispanic/Non-Latino')
        if split == "train":
            rows.append(f"CheXpert-v1.0-small/train/{pid}/study1/view1_frontal.jpg,Unknown,50,Frontal,AP" + ",0.0" * 14)
        (release / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "CHEXPERT DEMO.csv").write_text("\n".join(demo) + "\n")
    return root


def write_inaturalist(root: Path, version: str = "2019", per_category: int = 3, size: int = 16) -> Path:
    """torchvision's iNaturalist layouts: ``2019/<super>/<numeric category>/*.jpg`` (2 super categories, 3 species)
    or ``2021_train_mini/NNNNN_<kingdom>_..._<species>/*.jpg`` (3 species in 2 classes)."""
    rng = np.random.default_rng(6)
    if version.startswith("2021"):
        folders = ["00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax",
                   "00001_Animalia_Chordata_Aves_Passeriformes_Paridae_Parus_major",
                   "00002_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina"]  # fmt: skip
    else:
        folders = ["Birds/0", "Birds/1", "Plants/2"]  # 2018/2019: category ids 0..C-1 as folder names
    for c, folder in enumerate(folders):
        for i in range(per_category):
            pixels = rng.integers(0, 100, (size, size, 3)) + 60 * c
            _jpeg(root / version / folder / f"{c}{i:03d}abc.jpg", pixels.astype(np.uint8))
    return root
