"""segment-anything's automatic mask generator, with masks kept as bool arrays throughout.

The stock ``SamAutomaticMaskGenerator`` compresses every surviving mask of every point batch
to an uncompressed RLE (a Python loop per mask with a device to host copy each), deep-copies
those lists when it concatenates batches, and with ``output_mode="binary_mask"`` decodes
them all back at the end. We only want the binary masks (stage ``sam_auto`` encodes them
once as COCO RLE). :class:`BinaryMaskGenerator` runs the same steps in the same order on
the masks themselves, with the library's own functions, so its records equal the stock
generator's (``tests/models/test_sam.py``); the price is memory: one image's masks that
pass the filters are held as ``(N, H, W) bool`` until NMS.

Crop layers (``crop_n_layers > 0``) are the stock ones. One departure: a crop that keeps no
mask records its crop boxes as an empty ``(0, 4)`` tensor, where the stock generator's 1-D
``torch.tensor([])`` makes the cross-crop NMS raise ``IndexError`` when no mask survives in
any crop; here it returns no masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    calculate_stability_score,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from torchvision.ops.boxes import batched_nms


class BinaryMaskGenerator(SamAutomaticMaskGenerator):
    """``SamAutomaticMaskGenerator(output_mode="binary_mask")`` without the RLE round trip.

    Takes the stock generator's arguments except ``output_mode``; :meth:`generate` returns
    the stock records (``segmentation`` HxW bool, ``area``, ``bbox`` XYWH, ``predicted_iou``,
    ``point_coords``, ``stability_score``, ``crop_box`` XYWH).

    ``embedded``: the image array whose embedding ``predictor`` holds, set by an owner that
    shares the predictor and has just called ``set_image`` on it; :meth:`generate` of that
    very array then skips the whole-image ``set_image`` (the crop layers of
    ``crop_n_layers > 0`` are still embedded). None (the default) embeds every crop.
    """

    def __init__(self, model: Any, **kwargs: Any) -> None:
        super().__init__(model, output_mode="binary_mask", **kwargs)
        self.embedded: np.ndarray | None = None

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        data = self._generate_masks(image)  # the stock crop loop; ends with data.to_numpy()
        if self.min_mask_region_area > 0:
            data = self._remove_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        masks: np.ndarray = data["masks"]
        areas = masks.sum(axis=(1, 2)).tolist()
        return [
            {
                "segmentation": masks[i],
                "area": int(areas[i]),
                "bbox": box_xyxy_to_xywh(data["boxes"][i]).tolist(),
                "predicted_iou": data["iou_preds"][i].item(),
                "point_coords": [data["points"][i].tolist()],
                "stability_score": data["stability_score"][i].item(),
                "crop_box": box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
            }
            for i in range(len(masks))
        ]

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: list[int],
        crop_layer_idx: int,
        orig_size: tuple[int, ...],
    ) -> MaskData:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        whole = list(crop_box) == [0, 0, image.shape[1], image.shape[0]]
        if not (whole and self.embedded is image and self.predictor.is_image_set):
            self.predictor.set_image(cropped)
        points_for_image = (
            self.point_grids[crop_layer_idx] * np.array(cropped.shape[:2])[None, ::-1]
        )
        batches = [
            self._process_batch(points, cropped.shape[:2], crop_box, orig_size)
            for (points,) in batch_iterator(self.points_per_batch, points_for_image)
        ]
        self.predictor.reset_image()
        keys = [k for k, _ in batches[0].items()]
        data = MaskData(**{k: torch.cat([b[k] for b in batches]) for k in keys})
        keep = batched_nms(
            data["boxes"].float(),
            data["iou_preds"],
            torch.zeros(len(data["boxes"]), device=data["boxes"].device),
            iou_threshold=self.box_nms_thresh,
        )
        data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        # (N, 4) also for N = 0 (the stock 1-D empty tensor breaks the cross-crop NMS)
        data["crop_boxes"] = torch.tensor([crop_box], dtype=torch.int64).repeat(
            len(data["boxes"]), 1
        )
        return data

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: tuple[int, ...],
        crop_box: list[int],
        orig_size: tuple[int, ...],
    ) -> MaskData:
        orig_h, orig_w = orig_size
        transformed = self.predictor.transform.apply_coords(points, im_size)
        in_points = torch.as_tensor(transformed, device=self.predictor.device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)
        masks, iou_preds, _ = self.predictor.predict_torch(
            in_points[:, None, :], in_labels[:, None], multimask_output=True, return_logits=True
        )
        data = MaskData(
            masks=masks.flatten(0, 1),
            iou_preds=iou_preds.flatten(0, 1),
            points=torch.as_tensor(points.repeat(masks.shape[1], axis=0)),
        )
        del masks
        if self.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > self.pred_iou_thresh)
        threshold = self.predictor.model.mask_threshold
        data["stability_score"] = calculate_stability_score(
            data["masks"], threshold, self.stability_score_offset
        )
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data["masks"] = data["masks"] > threshold
        data["boxes"] = batched_mask_to_box(data["masks"])
        keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep):
            data.filter(keep)
        # where the stock generator compresses to RLE, the masks stay
        data["masks"] = uncrop_masks(data["masks"], crop_box, orig_h, orig_w)
        return data

    @staticmethod
    def _remove_small_regions(data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """The stock ``postprocess_small_regions`` on ``(N, H, W) bool`` numpy masks."""
        if not len(data["masks"]):
            return data
        masks, unchanged = [], []
        for mask in data["masks"]:
            mask, holes = remove_small_regions(mask, min_area, mode="holes")
            mask, islands = remove_small_regions(mask, min_area, mode="islands")
            masks.append(mask)
            unchanged.append(float(not (holes or islands)))
        new = torch.as_tensor(np.stack(masks))
        boxes = batched_mask_to_box(new)
        keep = batched_nms(
            boxes.float(),
            torch.as_tensor(unchanged),
            torch.zeros(len(boxes)),
            iou_threshold=nms_thresh,
        )
        changed = np.flatnonzero(np.asarray(unchanged) == 0.0)
        data["masks"] = new.numpy()
        data["boxes"][changed] = boxes[changed].numpy()
        data.filter(keep)
        return data
