# The README's Python example: a NIfTI volume in as a numpy array (x, y, z), as nibabel or MONAI
# give it; one box on one slice, propagated through the volume; the mask out on the scan's grid.
import os

import medsa

model = medsa.Model(".models/lite_medsam.safetensors",
                    adapter="examples/models/litemedsam_gm_adapter.safetensors")
volume, header = medsa.read_nifti("examples/data/mni152_val/images/mni152.nii.gz")
mask = model.segment(volume, {"box": [20, 20, 16, 175, 210, 16]}, propagate=True)
os.makedirs("examples/out", exist_ok=True)
medsa.write_nifti("examples/out/python_gm.nii.gz", mask, like=header)
truth, _ = medsa.read_nifti("examples/data/mni152_val/labels/mni152.nii.gz")
print(medsa.metrics.scores(mask > 0, truth == 2, spacing=header.spacing))
