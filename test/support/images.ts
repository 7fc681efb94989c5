// The image builders live with the testbed (npm start pushes an example
// image built by them); tests use the same ones.
export * from "../../testbed/images.js";
